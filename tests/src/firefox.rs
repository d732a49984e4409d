//! Headless Firefox ESR (Debian's `firefox-esr` package, which has no OpenH264: it offers VP8,
//! VP9 and AV1 only) driven through its console log.
//!
//! Each run gets a fresh profile whose `user.js` allows loopback ICE candidates, autoplay with
//! sound and the console on stdout (`devtools.console.stdout.content`: a page's
//! `console.log("x")` is printed as `console.log: "x"`), and keeps the browser quiet offline
//! (no telemetry, updates, safe browsing or first-run pages).

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use crate::chromium::field;

/// Where Debian installs it; `FIREFOX` overrides.
pub fn binary() -> String {
    std::env::var("FIREFOX").unwrap_or_else(|_| "/usr/bin/firefox-esr".into())
}

/// The preferences of every test profile.
pub const USER_JS: &str = r#"// WebRTC between the browser and a server on 127.0.0.1.
user_pref("media.peerconnection.ice.loopback", true);
user_pref("media.peerconnection.ice.obfuscate_host_addresses", false);
// Play with sound without a user gesture.
user_pref("media.autoplay.default", 0);
user_pref("media.autoplay.blocking_policy", 0);
// A page's console on stdout: this is how the verdict line is read.
user_pref("devtools.console.stdout.content", true);
// Quiet offline: no first-run, default-browser, telemetry, update or remote-service traffic.
user_pref("browser.shell.checkDefaultBrowser", false);
user_pref("browser.startup.homepage_override.mstone", "ignore");
user_pref("browser.aboutwelcome.enabled", false);
user_pref("startup.homepage_welcome_url", "");
user_pref("startup.homepage_welcome_url.additional", "");
user_pref("datareporting.policy.dataSubmissionEnabled", false);
user_pref("datareporting.healthreport.uploadEnabled", false);
user_pref("toolkit.telemetry.reportingpolicy.firstRun", false);
user_pref("toolkit.telemetry.enabled", false);
user_pref("toolkit.telemetry.unified", false);
user_pref("app.update.auto", false);
user_pref("app.update.enabled", false);
user_pref("app.normandy.enabled", false);
user_pref("extensions.update.enabled", false);
user_pref("extensions.getAddons.cache.enabled", false);
user_pref("browser.safebrowsing.malware.enabled", false);
user_pref("browser.safebrowsing.phishing.enabled", false);
user_pref("browser.safebrowsing.downloads.enabled", false);
user_pref("browser.safebrowsing.update.enabled", false);
user_pref("network.captive-portal-service.enabled", false);
user_pref("network.connectivity-service.enabled", false);
user_pref("network.dns.disablePrefetch", true);
user_pref("network.prefetch-next", false);
user_pref("browser.newtabpage.enabled", false);
user_pref("browser.newtabpage.activity-stream.feeds.system.topstories", false);
user_pref("browser.topsites.contile.enabled", false);
user_pref("browser.search.update", false);
user_pref("services.settings.server", "http://127.0.0.1:9/");
user_pref("browser.sessionstore.resume_from_crash", false);
user_pref("toolkit.startup.max_resumed_crashes", -1);
"#;

/// Opens `url` in a fresh profile and returns the first console line containing `[WHEP] PASS`
/// or `[WHEP] FAIL`, or `Err` with the browser's output when none came within `timeout`.
///
/// # Panics
///
/// When Firefox is not installed (the test command installs it).
pub fn run_page(url: &str, timeout: Duration) -> Result<String, String> {
    run_page_in(None, url, timeout)
}

/// [`run_page`] with Firefox inside the network namespace `netns` (see [`crate::netns`]) when
/// given: Firefox gathers no loopback candidates, so a test serves it on a namespace's
/// host-side veth address rather than on the machine's own addresses.
///
/// # Errors
///
/// As [`run_page`].
///
/// # Panics
///
/// When Firefox is not installed (the test command installs it).
pub fn run_page_in(netns: Option<&str>, url: &str, timeout: Duration) -> Result<String, String> {
    let bin = binary();
    assert!(
        Path::new(&bin).exists(),
        "{bin} is missing: install Debian's firefox-esr package (bash scripts/test.sh does)"
    );
    // One profile per browser: tests in one binary run browsers in parallel.
    static BROWSERS: AtomicU32 = AtomicU32::new(0);
    let profile = std::env::temp_dir().join(format!(
        "whep-e2e-firefox-{}-{}",
        std::process::id(),
        BROWSERS.fetch_add(1, Ordering::Relaxed)
    ));
    // Left by an earlier process with the same pid.
    let _ = std::fs::remove_dir_all(&profile);
    std::fs::create_dir_all(&profile).map_err(|e| format!("profile {}: {e}", profile.display()))?;
    std::fs::write(profile.join("user.js"), USER_JS)
        .map_err(|e| format!("user.js in {}: {e}", profile.display()))?;
    let mut cmd = crate::command_in(netns, &bin);
    // Its own process group: Firefox starts content, socket and GPU processes, and all of
    // them must go when the test is done.
    cmd.args(["--headless", "--no-remote", "--profile"])
        .arg(&profile)
        .arg(url)
        .env("MOZ_CRASHREPORTER_DISABLE", "1")
        .env("MOZ_HEADLESS", "1");
    let (group, rx) = match crate::spawn_group(&mut cmd) {
        Ok(spawned) => spawned,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&profile);
            return Err(format!("cannot start {bin}: {e}"));
        }
    };
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let result = loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break Err(format!("no verdict within {timeout:?}:\n{}", seen.join("\n")));
        };
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("[WHEP] PASS") || line.contains("[WHEP] FAIL") => {
                break Ok(line);
            }
            Ok(line) => seen.push(line),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                break Err(format!("no verdict within {timeout:?}:\n{}", seen.join("\n")));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err(format!("firefox exited without a verdict:\n{}", seen.join("\n")));
            }
        }
    };
    drop(group);
    let _ = std::fs::remove_dir_all(&profile);
    result
}
