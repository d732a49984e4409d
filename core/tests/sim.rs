//! Simulation tests: the core with str0m viewers, a scripted FFmpeg and a virtual clock.

use std::time::Duration;

use whep_core::StreamConfig;
use whep_core::sim::{self, SimWorld};

const SEC: Duration = Duration::from_secs(1);

#[test]
fn one_viewer_receives_video_and_audio() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let (v, resp) = w.join(&demo);
    assert_eq!(resp.code(), 201, "{}", String::from_utf8_lossy(&resp.body));
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 100 && w.viewers[v].audio_packets > 20);
    let viewer = &w.viewers[v];
    assert!(viewer.connected);
    assert!(viewer.first_video_is_keyframe == Some(true));
    assert!(viewer.first_video_seq.is_some() && viewer.first_audio_seq.is_some());
}
