//! Test helpers shared by every crate (feature `test-util`).

pub mod transcript;

/// Installs a tracing subscriber that writes through the test harness's capture. Safe to call
/// from every test; only the first call installs it.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}
