//! Third-party WHEP players run as child processes: GStreamer's `webrtcbin` through Python
//! GObject (`clients/gst_whep.py`, Debian's GStreamer 1.22 and `/usr/bin/python3`) and aiortc
//! (`clients/aiortc_whep.py`, from PyPI, in the virtual environment `scripts/test.sh` makes at
//! `$HOME/.cache/whep-venv`).
//!
//! Each client prints one `[WHEP] EVENT key=value ...` line per event and ends with
//! `[WHEP] PASS ...` after decoding the frames asked for, or `[WHEP] FAIL reason=...`; [`run`]
//! starts one (in a network namespace when given: libnice gathers no loopback candidate), reads
//! its lines until the verdict or a timeout, and kills it (its whole process group) when it is
//! done or the test panics.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use crate::chromium::{field, number};

/// A player and how it offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Player {
    /// GStreamer webrtcbin with this bundle policy (`max-bundle`, `max-compat` or `balanced`),
    /// with an ECDSA certificate for its DTLS.
    Gst(&'static str),
    /// GStreamer webrtcbin (max-bundle) with the RSA-2048 certificate it makes itself, which
    /// the server's DTLS refuses.
    GstStockCert,
    /// aiortc offering these video codecs (`h264`, `vp8` or `any`).
    Aiortc(&'static str),
}

impl Player {
    /// A short name for messages (`gst-max-bundle`, `aiortc-vp8`, ...).
    pub fn name(self) -> String {
        match self {
            Self::Gst(bundle) => format!("gst-{bundle}"),
            Self::GstStockCert => "gst-rsa".into(),
            Self::Aiortc(codec) => format!("aiortc-{codec}"),
        }
    }

    /// The command that plays `url` and passes after `frames` decoded video frames, failing
    /// itself after `timeout`.
    ///
    /// # Panics
    ///
    /// When the player's interpreter is missing (the message says how to install it).
    pub fn command(self, url: &str, frames: u32, timeout: Duration) -> Command {
        let (python, script, mut args) = match self {
            Self::Gst(bundle) => (gst_python(), "gst_whep.py", vec!["--bundle", bundle]),
            Self::GstStockCert => {
                (gst_python(), "gst_whep.py", vec!["--bundle", "max-bundle", "--cert", "stock"])
            }
            Self::Aiortc(codec) => (venv_python(), "aiortc_whep.py", vec!["--codec", codec]),
        };
        let frames = frames.to_string();
        let timeout = format!("{:.1}", timeout.as_secs_f64());
        args.extend(["--frames", &frames, "--timeout", &timeout]);
        let mut cmd = Command::new(python);
        cmd.arg(client(script)).arg(url).args(args);
        cmd
    }
}

/// The path of a client script of `tests/clients/`.
pub fn client(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients").join(script)
}

/// The Python with GStreamer's GObject bindings: Debian's (`GST_PYTHON` overrides; a pyenv
/// `python3` first on `PATH` has no `gi`).
pub fn gst_python() -> String {
    let python = std::env::var("GST_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    assert!(
        Path::new(&python).exists(),
        "{python} is missing: install Debian's python3-gi, gir1.2-gst-plugins-bad-1.0, \
         gstreamer1.0-nice and gstreamer1.0-plugins-bad (bash scripts/test.sh does)"
    );
    python
}

/// The virtual environment with aiortc: `WHEP_VENV`, else `$HOME/.cache/whep-venv`.
pub fn venv() -> PathBuf {
    std::env::var_os("WHEP_VENV").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        Path::new(&home).join(".cache/whep-venv")
    })
}

/// The virtual environment's Python (aiortc, PyJWT), asserted to exist.
pub fn venv_python() -> String {
    let python = venv().join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: bash scripts/test.sh makes the virtual environment with aiortc",
        python.display()
    );
    python.display().to_string()
}

/// What a player run gave.
#[derive(Debug)]
pub struct Run {
    /// The `[WHEP] PASS` or `[WHEP] FAIL` line, or `Err` with the player's output when it
    /// gave none in time or exited without one.
    pub verdict: Result<String, String>,
    /// Every line the player printed, with when it came.
    pub lines: Vec<(Instant, String)>,
    /// When the player was started.
    pub started: Instant,
}

impl Run {
    /// Whether the verdict is a PASS.
    pub fn passed(&self) -> bool {
        self.verdict.as_ref().is_ok_and(|v| v.contains("[WHEP] PASS"))
    }

    /// A number field of the verdict line.
    pub fn num(&self, key: &str) -> Option<f64> {
        number(self.verdict.as_deref().ok()?, key)
    }

    /// A field of the verdict line.
    pub fn field(&self, key: &str) -> Option<&str> {
        field(self.verdict.as_deref().ok()?, key)
    }

    /// The player's output, for failure messages.
    pub fn output(&self) -> String {
        let lines: Vec<&str> = self.lines.iter().map(|(_, l)| l.as_str()).collect();
        format!("verdict: {:?}\nplayer output:\n{}", self.verdict, lines.join("\n"))
    }
}

/// Runs `player` on the WHEP endpoint `url` (inside the network namespace `netns`, by name,
/// when given) until its verdict, for at most `timeout` (the player gives up itself a little
/// earlier, so that its own reason is what a failure shows).
///
/// # Panics
///
/// When the player's interpreter is missing.
pub fn run(player: Player, netns: Option<&str>, url: &str, frames: u32, timeout: Duration) -> Run {
    let own = timeout.saturating_sub(Duration::from_secs(5)).max(Duration::from_secs(5));
    let inner = player.command(url, frames, own);
    let mut cmd = crate::command_in(netns, inner.get_program());
    cmd.args(inner.get_args()).env("PYTHONUNBUFFERED", "1").env("PYTHONDONTWRITEBYTECODE", "1");
    let started = Instant::now();
    let (_group, rx) = match crate::spawn_group(&mut cmd) {
        Ok(spawned) => spawned,
        Err(e) => {
            let verdict = Err(format!("cannot start {}: {e}", player.name()));
            return Run { verdict, lines: Vec::new(), started };
        }
    };
    let deadline = started + timeout;
    let mut lines = Vec::new();
    let verdict = loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break Err(format!("{}: no verdict within {timeout:?}", player.name()));
        };
        match rx.recv_timeout(left) {
            Ok(line) => {
                let verdict = line.starts_with("[WHEP] PASS") || line.starts_with("[WHEP] FAIL");
                lines.push((Instant::now(), line.clone()));
                if verdict {
                    break Ok(line);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                break Err(format!("{}: no verdict within {timeout:?}", player.name()));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err(format!("{} exited without a verdict", player.name()));
            }
        }
    };
    Run { verdict, lines, started }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_name_the_script_and_the_options() {
        let show = |c: &Command| {
            let args: Vec<String> =
                c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
            args.join(" ")
        };
        // Only the arguments: the interpreters need not be installed for this.
        if Path::new(&std::env::var("GST_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into()))
            .exists()
        {
            let c =
                Player::Gst("max-compat").command("http://h/whep/x", 30, Duration::from_secs(9));
            let s = show(&c);
            assert!(s.ends_with(
                "gst_whep.py http://h/whep/x --bundle max-compat --frames 30 --timeout 9.0"
            ));
            let s = show(&Player::GstStockCert.command("u", 1, Duration::from_secs(1)));
            assert!(s.contains("--cert stock"), "{s}");
        }
        assert_eq!(Player::Aiortc("vp8").name(), "aiortc-vp8");
        assert_eq!(Player::Gst("max-bundle").name(), "gst-max-bundle");
        assert!(client("gst_whep.py").exists() && client("aiortc_whep.py").exists());
    }
}
