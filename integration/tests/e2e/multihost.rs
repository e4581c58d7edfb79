//! The platform on eleven test hosts (network namespaces on 192.0.2.0/24, PostgreSQL as the
//! location database): `tests/multihost/run.sh` does the work and says what it checks.

use std::process::Command;

#[test]
fn the_platform_spread_over_test_hosts_delivers_holds_and_migrates() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .is_ok_and(|o| o.status.success());
    let postgres = std::fs::read_dir("/usr/lib/postgresql").is_ok();
    if !(root && netns && postgres) {
        assert!(
            std::env::var_os("MAILPLATFORM_REQUIRE_ROOT_TESTS").is_none(),
            "the multi-host test needs root, iproute2 and PostgreSQL (root {root}, ip netns \
             {netns}, postgresql {postgres}), and MAILPLATFORM_REQUIRE_ROOT_TESTS is set"
        );
        eprintln!("skipped: the multi-host test needs root, ip netns and PostgreSQL");
        return;
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/multihost/run.sh");
    // Bounded: the script cleans up (its EXIT trap) when the timeout's TERM arrives.
    let out = Command::new("timeout")
        .args(["300", "bash"])
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_mailctl"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(out.status.success(), "run.sh failed: {stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("multihost: ok"));
    for step in [
        "step 1:",
        "step 2: filer3 cut off",
        "step 2: filer3 back",
        "step 3:",
    ] {
        assert!(stderr.contains(step), "{step} missing: {stderr}");
    }
}
