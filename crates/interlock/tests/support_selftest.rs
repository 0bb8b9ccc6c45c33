//! The re-exec child support works: a child answers, echoes and exits.
mod support;
use support::Child;

#[test]
fn child_round_trip() {
    if let Some(role) = support::role() {
        assert_eq!(role, "echo");
        support::say(format!("ready {}", support::arg()));
        while let Some(line) = support::hear() {
            if line == "quit" {
                return;
            }
            support::say(line);
        }
        return;
    }
    let mut c = Child::spawn("child_round_trip", "echo", "x");
    c.expect("ready x");
    c.send("ping");
    c.expect("ping");
    c.send("quit");
    c.join();
}
