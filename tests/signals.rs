//! The binary under a supervisor's signals: SIGTERM drains (new sessions get 503, running streams
//! continue until the drain timeout, exit 0), SIGHUP reloads what can change live without
//! dropping sessions.

mod common;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Sluice {
    child: Child,
    base: String,
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(config: &std::path::Path) -> Sluice {
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = http.local_addr().unwrap().port();
    drop(http);
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config"])
        .arg(config)
        .env("SLUICE_HTTP_LISTEN", format!("127.0.0.1:{port}"))
        .env("SLUICE_MEDIA_PORT_BASE", port_base().to_string())
        .env("SLUICE_MEDIA_SHARDS", "1")
        .env("SLUICE_MEDIA_LISTEN_IPS", "127.0.0.1")
        .env("SLUICE_MEDIA_PIN_CORES", "false")
        .env("SLUICE_TURN_LISTEN", "127.0.0.1:0")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sluice binary runs");
    let base = format!("http://127.0.0.1:{port}");
    assert!(
        wait_until(Duration::from_secs(10), || ureq::get(&format!(
            "{base}/healthz"
        ))
        .call()
        .is_ok()),
        "sluice came up"
    );
    Sluice { child, base }
}

fn config_file(max_peers: usize, drain_ms: u64) -> tempfile_path::Path {
    tempfile_path::write(&format!(
        "[limits]\nmax_peers = {max_peers}\ndrain_timeout_ms = {drain_ms}\n"
    ))
}

mod tempfile_path {
    use std::sync::atomic::{AtomicU32, Ordering};
    pub struct Path(pub std::path::PathBuf);
    impl Drop for Path {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    impl std::ops::Deref for Path {
        type Target = std::path::Path;
        fn deref(&self) -> &std::path::Path {
            &self.0
        }
    }
    pub fn write(text: &str) -> Path {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "sluice-test-{}-{}.toml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&p, text).unwrap();
        Path(p)
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

fn whep_status(base: &str) -> u16 {
    match ureq::post(&format!("{base}/whep/live"))
        .set("Content-Type", "application/sdp")
        .send_string("v=0\r\n")
    {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn sigterm_drains_then_exits_zero() {
    init_log();
    let cfg = config_file(100, 2500);
    let mut s = spawn(&cfg);
    let publisher = Client::publish_to(&s.base, "live").unwrap();
    assert!(publisher.wait_connected(Duration::from_secs(10)));
    let viewer = Client::play_from(&s.base, "live").unwrap();
    assert!(viewer.wait_connected(Duration::from_secs(10)));
    assert!(wait_until(Duration::from_secs(5), || viewer
        .received()
        .len()
        > 20));

    let t0 = Instant::now();
    signal(&s.child, "-TERM");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        whep_status(&s.base),
        503,
        "new sessions are refused while draining"
    );
    let metrics = ureq::get(&format!("{}/metrics", s.base))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(metrics.contains("sluice_draining 1"), "draining gauge");
    let during = viewer.received().len();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        viewer.received().len() > during + 50,
        "the stream continues during the drain"
    );

    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "exits after the drain timeout"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
    assert!(
        t0.elapsed() >= Duration::from_millis(2400),
        "kept sessions until the drain timeout: {:?}",
        t0.elapsed()
    );
}

#[test]
fn sighup_reloads_limits_without_dropping_sessions() {
    init_log();
    let cfg = config_file(100, 30_000);
    let s = spawn(&cfg);
    let publisher = Client::publish_to(&s.base, "live").unwrap();
    assert!(publisher.wait_connected(Duration::from_secs(10)));
    let viewer = Client::play_from(&s.base, "live").unwrap();
    assert!(viewer.wait_connected(Duration::from_secs(10)));
    assert!(wait_until(Duration::from_secs(5), || viewer
        .received()
        .len()
        > 20));

    // Lower max_peers below the current two sessions: new ones are refused, running ones stay.
    let mut f = std::fs::File::create(&*cfg).unwrap();
    f.write_all(b"[limits]\nmax_peers = 2\ndrain_timeout_ms = 30000\n")
        .unwrap();
    drop(f);
    signal(&s.child, "-HUP");
    assert!(
        wait_until(Duration::from_secs(5), || whep_status(&s.base) == 503),
        "the new limit applies"
    );
    let before = viewer.received().len();
    assert!(
        wait_until(Duration::from_secs(3), || viewer.received().len()
            > before + 50),
        "sessions survive the reload"
    );
}

#[test]
fn sighup_reloads_the_auth_secret_without_dropping_sessions() {
    use sluice::control::auth::{mint, Claims};
    init_log();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let tok = |secret: &str, publish: bool| {
        mint(
            secret.as_bytes(),
            &Claims::new("t", "live", publish, !publish, now, 600),
        )
    };
    let (a, b) = ("first-secret-0123456789", "second-secret-0123456789");
    let cfg = tempfile_path::write(&format!("[auth]\njwt_secret = \"{a}\"\n"));
    let s = spawn(&cfg);
    let publisher = Client::with_token(&s.base, "live", true, &tok(a, true)).unwrap();
    assert!(publisher.wait_connected(Duration::from_secs(10)));
    let viewer = Client::with_token(&s.base, "live", false, &tok(a, false)).unwrap();
    assert!(viewer.wait_connected(Duration::from_secs(10)));
    assert!(wait_until(Duration::from_secs(5), || viewer
        .received()
        .len()
        > 20));

    std::fs::write(&*cfg, format!("[auth]\njwt_secret = \"{b}\"\n")).unwrap();
    signal(&s.child, "-HUP");
    assert!(
        wait_until(Duration::from_secs(5), || Client::with_token(
            &s.base,
            "live",
            false,
            &tok(a, false)
        )
        .err()
        .is_some_and(|e| e.starts_with("401"))),
        "tokens of the old secret are refused after the reload"
    );
    let second =
        Client::with_token(&s.base, "live", false, &tok(b, false)).expect("new secret works");
    assert!(second.wait_connected(Duration::from_secs(10)));
    let before = viewer.received().len();
    assert!(
        wait_until(Duration::from_secs(3), || viewer.received().len()
            > before + 50),
        "sessions admitted under the old secret keep streaming"
    );
}
