//! The torture harness must report real violations and must not invent
//! them: a lock that excludes nothing fails, a kernel lock passes.
//! Short runs with generous bounds: these check the harness, not speed.

use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_interlock-bench"))
}

fn torture(kind: &str, seconds: &str) -> (bool, String) {
    let out = bench()
        .args([
            "torture",
            "--kind",
            kind,
            "--procs",
            "4",
            "--seconds",
            seconds,
        ])
        // A loaded CI machine may stall for a while; this test is about
        // violations, so the stall bound is generous.
        .args(["--stall-bound-ms", "5000"])
        .output()
        .expect("run interlock-bench");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn no_lock_is_caught() {
    let (ok, text) = torture("none", "1");
    assert!(!ok, "{text}");
    assert!(text.contains("FAIL"), "{text}");
    assert!(!text.contains(" 0 violations"), "{text}");
}

#[test]
fn a_semaphore_with_a_permit_too_many_is_caught() {
    // The control of the "never more than N inside" check.
    let (ok, text) = torture("sem-broken", "1");
    assert!(!ok, "{text}");
    assert!(!text.contains(" 0 violations"), "{text}");
}

#[test]
fn the_semaphore_passes_with_kills() {
    let (ok, text) = torture("shm-sem", "2");
    assert!(ok, "{text}");
    assert!(text.contains(" 0 violations"), "{text}");
    assert!(!text.contains(" 0 kills"), "{text}");
}

#[test]
fn kernel_lock_passes_with_kills() {
    let (ok, text) = torture("floor-flock", "2");
    assert!(ok, "{text}");
    assert!(text.contains(" 0 violations"), "{text}");
    assert!(!text.contains(" 0 kills"), "{text}");
}

#[test]
fn list_names_floors_and_peers() {
    let out = bench().arg("list").output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    for t in [
        "floor-ofd",
        "floor-flock",
        "floor-futex",
        "floor-mkdir",
        "fs4",
        "pthread-rwlock",
    ] {
        assert!(s.contains(t), "{t} missing from\n{s}");
    }
}
