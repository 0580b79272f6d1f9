//! syncrelay: sync job run events in (embedded durable queue or Kafka), signed webhooks out.
// No unsafe code but one module: the SQLite VFS that writes the WAL a commit at a time
// (`store::sqlite::wal_writes`, FFI by nature), which says `allow` for itself alone.
#![deny(unsafe_code)]

pub mod api;
pub mod config;
pub mod delivery;
pub mod domain;
pub mod error;
pub mod intake;
pub mod metrics;
pub mod ordering;
pub mod routing;
pub mod runs;
pub mod signing;
pub mod store;
pub mod syncs;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};
use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::delivery::engine::Engine;
use crate::metrics::Metrics;
use crate::signing::Secret;
use crate::store::Store;

/// The whole service, bound and ready: `port()` is known before `run_until_stopped`, so tests
/// can use port 0.
pub struct Application {
    port: u16,
    server: actix_web::dev::Server,
    engine: Arc<Engine>,
    settings: Settings,
    kafka: Option<Arc<intake::kafka::KafkaBus>>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let store = Store::open(&settings.store).await?;
        let callback_secret = if settings.callbacks.secret.is_empty() {
            store
                .secret_get_or_insert("callbacks.secret", &Secret::generate())
                .await
                .context("stored callback secret")?
        } else {
            Secret::parse(&settings.callbacks.secret).context("callbacks.secret")?
        };
        let engine = Engine::new(&settings, store, Metrics::new(), callback_secret);
        engine.load_webhooks().await?;

        let listener = TcpListener::bind(&settings.http.listen)
            .with_context(|| format!("binding http.listen {}", settings.http.listen))?;
        let port = listener.local_addr()?.port();
        let kafka = match settings.bus.kind {
            config::BusKind::Kafka => Some(intake::kafka::KafkaBus::new(&settings, engine.metrics.clone())?),
            config::BusKind::Embedded => None,
        };
        let commands: Arc<dyn runs::commands::CommandSink> = match &kafka {
            Some(k) => k.clone(),
            None => Arc::new(runs::commands::EmbeddedCommands {
                store: engine.store.clone(),
            }),
        };
        engine.set_commands(commands.clone());
        if let Some(k) = &kafka {
            engine.set_dead_letter_sink(k.clone());
        }
        let state = web::Data::new(api::AppState {
            settings: settings.clone(),
            engine: engine.clone(),
            commands,
            kafka: kafka.clone(),
            token_digests: settings.auth.tokens.iter().map(|t| api::token_digest(t)).collect(),
            rate_limiter: api::RateLimiter::new(&settings.http.rate_limit, settings.auth.tokens.len()),
            query_params: api::QueryParams::from_document(&api::openapi_document(&settings)),
        });
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .app_data(api::query_config())
                .configure(api::configure)
        })
        .disable_signals()
        .shutdown_timeout(settings.shutdown.deadline_ms.div_ceil(1000).max(1));
        if settings.http.workers > 0 {
            server = server.workers(settings.http.workers);
        }
        let server = server.listen(listener)?.run();
        tracing::info!(address = %settings.http.listen, port, "syncrelay listening");
        Ok(Application {
            port,
            server,
            engine,
            settings,
            kafka,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serve until `shutdown` resolves: then stop intake (the listener closes), let in-flight
    /// attempts finish within `shutdown.deadline_ms`, and return. Nothing queued is lost: it is
    /// in the store and resumes at the next start.
    pub async fn run_until_stopped(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        let deadline = Duration::from_millis(self.settings.shutdown.deadline_ms);
        let engine = tokio::spawn(self.engine.clone().run(stop.clone(), deadline));
        let consumer = self
            .kafka
            .clone()
            .map(|k| tokio::spawn(k.run(self.engine.clone(), stop.clone())));
        let handle = self.server.handle();
        let server = tokio::spawn(self.server);
        shutdown.await;
        tracing::info!("shutting down: intake stopped, draining in-flight deliveries");
        let stopping = tokio::spawn(async move { handle.stop(true).await });
        stop.cancel();
        if let Some(consumer) = consumer {
            let _ = consumer.await;
        }
        // The delivery core finishes what is under way (within the deadline) and records it;
        // then the finished prefix of every partition is committed and the group left.
        let _ = engine.await;
        if let Some(k) = &self.kafka {
            k.commit_final().await;
        }
        let _ = stopping.await;
        let _ = server.await;
        self.engine.store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
