//! A real `keycast server` stopped with SIGSTOP for longer than its refresh timeout, then
//! continued: no member is expired or told it was evicted, and both end normally.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A child process that cannot outlive a failed test.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sets `key = value` on the line that starts with `key =` in a config file.
fn set(path: &Path, key: &str, value: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    let prefix = format!("{key} =");
    assert!(text.lines().any(|l| l.starts_with(&prefix)), "{} has no {key}", path.display());
    let edited: Vec<String> =
        text.lines().map(|l| if l.starts_with(&prefix) { format!("{key} = {value}") } else { l.to_string() }).collect();
    std::fs::write(path, edited.join("\n") + "\n").unwrap();
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill").args([name, &child.id().to_string()]).status().unwrap();
    assert!(status.success(), "kill {name}");
}

#[test]
fn a_paused_controller_expires_no_member() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let bin = env!("CARGO_BIN_EXE_keycast");
    let init = Command::new(bin).args(["init", ".", "--members", "2", "--port", &port.to_string()]).current_dir(dir.path()).output().unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let server_toml = dir.path().join("server.toml");
    set(&server_toml, "epoch_ms", "300");
    set(&server_toml, "heartbeat_ms", "150");
    set(&server_toml, "refresh_timeout_ms", "2000");
    for i in 1..=2 {
        let member = dir.path().join(format!("member-{i}.toml"));
        set(&member, "refresh_ms", "400");
        set(&member, "heartbeat_ms", "150");
    }
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let server = KillOnDrop(
        Command::new(bin).args(["server", "--config", "server.toml"]).current_dir(dir.path()).stdout(Stdio::null()).stderr(log).spawn().unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let members: Vec<KillOnDrop> = (1..=2)
        .map(|i| {
            KillOnDrop(
                Command::new(bin)
                    .args(["member", "--config", &format!("member-{i}.toml"), "--for-secs", "12"])
                    .current_dir(dir.path())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    // Five seconds stopped: two and a half refresh timeouts.
    signal(&server.0, "-STOP");
    std::thread::sleep(Duration::from_secs(5));
    signal(&server.0, "-CONT");
    for (i, mut member) in members.into_iter().enumerate() {
        let status = member.0.wait().unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(member.0.stdout.as_mut().unwrap(), &mut out).unwrap();
        assert!(!out.to_lowercase().contains("evicted"), "member-{} was told it was evicted:\n{out}", i + 1);
        assert!(status.success(), "member-{} ended with {status}:\n{out}", i + 1);
    }
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(!log.contains("Expired"), "the controller expired members for its own pause:\n{log}");
}
