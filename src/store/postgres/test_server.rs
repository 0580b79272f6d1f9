//! The integration tests' PostgreSQL (`tests/support/postgres.rs`: a real server started by the
//! test process, from the binaries `scripts/test.sh` installs), for the unit tests.

#[allow(dead_code)]
#[path = "../../../tests/support/postgres.rs"]
mod server;

pub(crate) use server::database;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
