//! Checking whepd's signed requests (the webhook's deliveries, the authorisation callback's
//! requests) as a receiver would, with an implementation that is not whepd's: the
//! [Standard Webhooks](https://www.standardwebhooks.com/) verification written with Python's
//! standard library (`hmac`, `hashlib`, `base64`).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// The verifier: the secret file's path as its argument, the requests as JSON on stdin
/// (`[{"headers": {name: value}, "body": hex}]`); one line per request, `ok` or what is wrong.
const VERIFY_PY: &str = r#"
import base64, hashlib, hmac, json, sys, time
secret = open(sys.argv[1]).read().strip()
key = base64.b64decode(secret.removeprefix("whsec_"))
for d in json.load(sys.stdin):
    h = {k.lower(): v for k, v in d["headers"].items()}
    body = bytes.fromhex(d["body"])
    try:
        msg_id, ts, sigs = h["webhook-id"], h["webhook-timestamp"], h["webhook-signature"]
    except KeyError as e:
        print("missing", e); continue
    if abs(time.time() - int(ts)) > 300:
        print("stale timestamp", ts); continue
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    want = base64.b64encode(mac).decode()
    ok = any(s.startswith("v1,") and hmac.compare_digest(s[3:], want) for s in sigs.split())
    print("ok" if ok else "bad signature " + sigs)
"#;

/// A signed request as received: its header fields (name, value) and its body.
pub type Signed<'a> = (&'a [(String, String)], &'a [u8]);

/// Verifies each request (its header fields and body) with the `whsec_` key in `secret_file`:
/// one verdict per request, `ok`, `missing …`, `stale timestamp …` or `bad signature …`.
///
/// # Panics
///
/// When `python3` cannot be run or fails.
pub fn verify_standard_webhooks(secret_file: &Path, requests: &[Signed<'_>]) -> Vec<String> {
    let input: Vec<serde_json::Value> = requests
        .iter()
        .map(|(headers, body)| {
            let headers: serde_json::Map<String, serde_json::Value> =
                headers.iter().map(|(n, v)| (n.clone(), v.as_str().into())).collect();
            let hex: String = body.iter().map(|b| format!("{b:02x}")).collect();
            serde_json::json!({ "headers": headers, "body": hex })
        })
        .collect();
    let mut child = Command::new("python3")
        .args(["-c", VERIFY_PY])
        .arg(secret_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let input = serde_json::Value::Array(input).to_string();
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("python3");
    assert!(out.status.success(), "the verifier failed");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}
