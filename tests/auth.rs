//! Token auth on WHIP and WHEP: missing or invalid tokens get 401, valid tokens without the
//! right or for another stream get 403, and each refusal is counted by reason.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use sluice::config::IoBackend;
use sluice::control::auth::{mint, Claims};

const SECRET: &str = "test-secret-0123456789abcdef";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(room: &str, publish: bool, subscribe: bool, ttl: i64) -> String {
    let mut c = Claims::new("ann", room, publish, subscribe, now(), 3600);
    c.exp = (now() as i64 + ttl) as u64;
    mint(SECRET.as_bytes(), &c)
}

#[test]
fn whip_and_whep_require_the_right_token() {
    let mut c = config(1, IoBackend::Mmsg);
    c.auth.jwt_secret = Some(SECRET.into());
    let server = start(c);
    let base = format!("http://{}", server.http_addr);

    let err = Client::publish(&server, "cam").err().unwrap();
    assert!(
        err.starts_with("401") && err.contains("missing_token"),
        "no token: {err}"
    );

    let err = Client::with_token(&base, "cam", true, &token("other", true, true, 600))
        .err()
        .unwrap();
    assert!(
        err.starts_with("403") && err.contains("wrong_room"),
        "wrong room: {err}"
    );

    let err = Client::with_token(&base, "cam", true, &token("cam", true, true, -10))
        .err()
        .unwrap();
    assert!(
        err.starts_with("401") && err.contains("token_expired"),
        "expired: {err}"
    );

    let err = Client::with_token(&base, "cam", true, &token("cam", false, true, 600))
        .err()
        .unwrap();
    assert!(
        err.starts_with("403") && err.contains("publish_not_allowed"),
        "no publish right: {err}"
    );

    let forged = mint(
        b"another-secret-0123456789",
        &Claims::new("ann", "cam", true, true, now(), 600),
    );
    let err = Client::with_token(&base, "cam", true, &forged)
        .err()
        .unwrap();
    assert!(
        err.starts_with("401") && err.contains("bad_signature"),
        "forged: {err}"
    );

    // The right tokens work, "*" included.
    let publisher =
        Client::with_token(&base, "cam", true, &token("cam", true, false, 600)).unwrap();
    assert!(publisher.wait_connected(Duration::from_secs(10)));
    let err = Client::with_token(&base, "cam", false, &token("cam", true, false, 600))
        .err()
        .unwrap();
    assert!(
        err.starts_with("403") && err.contains("subscribe_not_allowed"),
        "{err}"
    );
    let viewer = Client::with_token(&base, "cam", false, &token("*", false, true, 600)).unwrap();
    assert!(viewer.wait_connected(Duration::from_secs(10)));
    assert!(wait_until(Duration::from_secs(5), || !viewer
        .received()
        .is_empty()));

    let metrics = ureq::get(&format!("{base}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    for reason in [
        "missing_token",
        "wrong_room",
        "token_expired",
        "publish_not_allowed",
        "bad_signature",
        "subscribe_not_allowed",
    ] {
        let line = format!("sluice_auth_failures_total{{reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "{line} in metrics");
    }
}
