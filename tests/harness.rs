//! The test support itself (tests/support): the PostgreSQL the tests start, the metrics parser.

mod support;

use std::time::Duration;

use sqlx::Connection as _;
use support::metrics::Metrics;
use support::postgres::{self, PgServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_starts_and_each_call_gets_its_own_database() {
    let (a, b) = tokio::task::spawn_blocking(|| (postgres::database(), postgres::database()))
        .await
        .unwrap();
    assert_ne!(a, b);
    assert!(a.starts_with("postgres://postgres@127.0.0.1:"), "{a}");

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&a)
        .await
        .expect("connect to the test PostgreSQL");
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await
        .unwrap();
    println!("PostgreSQL {version} at {a}");
    sqlx::query("CREATE TABLE t (id bigint PRIMARY KEY, v text NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO t VALUES (1, 'one'), (2, 'two')")
        .execute(&pool)
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 2);
    // SKIP LOCKED, what a queue on PostgreSQL claims with, works on this server.
    let claimed: Vec<i64> = sqlx::query_scalar("SELECT id FROM t ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(claimed, vec![1]);

    // The other database is empty.
    let mut other = sqlx::PgConnection::connect(&b).await.unwrap();
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        .fetch_one(&mut other)
        .await
        .unwrap();
    assert_eq!(tables, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_of_its_own_stops_and_goes_away_on_drop() {
    let server = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let (port, dir) = (server.port, server.dir.clone());
    let url = server.create_database();
    let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut c).await.unwrap();
    assert_eq!(one, 1);
    drop(c);
    tokio::task::spawn_blocking(move || drop(server)).await.unwrap();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens on {port} after the drop"
    );
    assert!(!dir.exists(), "{} is removed", dir.display());
}

#[test]
fn metrics_parser_reads_names_labels_and_values() {
    let m = Metrics::parse(concat!(
        "# HELP a A counter.\n",
        "# TYPE a counter\n",
        "a 3\n",
        "b{k=\"v\",q=\"a\\\"b,c}\"} 1.5\n",
        "b{k=\"w\"} 2\n",
        "h_bucket{le=\"+Inf\"} 7\n",
        "g -Inf\n",
    ));
    assert_eq!(m.value("a", &[]), 3.0);
    assert_eq!(m.value("b", &[]), 3.5, "the sum over the matching series");
    assert_eq!(m.value("b", &[("q", "a\"b,c}")]), 1.5);
    assert_eq!(m.value("b", &[("k", "w")]), 2.0);
    assert_eq!(m.get("b", &[("k", "z")]), None);
    assert_eq!(m.get("c", &[]), None);
    assert_eq!(m.value("h_bucket", &[("le", "+Inf")]), 7.0);
    assert_eq!(m.value("g", &[]), f64::NEG_INFINITY);
}

#[test]
#[should_panic(expected = "metric series b[(\"k\", \"z\")] is absent; series of b present: {\"k\": \"v\"}")]
fn an_absent_metric_series_fails_the_assertion_instead_of_reading_zero() {
    Metrics::parse("b{k=\"v\"} 0\n").value("b", &[("k", "z")]);
}
