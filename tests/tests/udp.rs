//! The runtimes' UDP sockets as the driver reads them (`UdpSocket::poll_recv`): datagrams the
//! kernel coalesced (UDP GRO, which quinn-udp turns on for every socket) come back whole and
//! split one by one, and each receive carries its age from the kernel's receive timestamp.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::time::Duration;

use whep_server::driver::{Received, Runtime, UdpSocket};

/// Datagram sizes sent in one segmented send: three full segments and a shorter last one.
const SIZES: [usize; 4] = [1000, 1000, 1000, 400];
/// How long the datagrams wait in the socket before they are read.
const QUEUED: Duration = Duration::from_millis(30);

/// Sends `SIZES` to `to` in one GSO call from a fresh socket; each datagram is filled with its
/// index.
fn send_segmented(to: SocketAddr) {
    let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind sender");
    let state = quinn_udp::UdpSocketState::new((&tx).into()).expect("quinn-udp state");
    assert!(
        state.max_gso_segments() >= SIZES.len(),
        "this test needs UDP GSO (Linux >= 4.18): max segments {}",
        state.max_gso_segments()
    );
    let contents: Vec<u8> =
        SIZES.iter().enumerate().flat_map(|(i, &n)| std::iter::repeat_n(i as u8, n)).collect();
    let transmit = quinn_udp::Transmit {
        destination: to,
        ecn: None,
        contents: &contents,
        segment_size: Some(SIZES[0]),
        src_ip: None,
    };
    state.try_send((&tx).into(), &transmit).expect("segmented send");
}

/// Receives until every datagram of `SIZES` is back; returns each datagram's length and first
/// byte, and the receives.
async fn receive_all<S: UdpSocket>(socket: &S) -> (Vec<(usize, u8)>, Vec<Received>) {
    let mut buf = vec![0u8; 1 << 17];
    let (mut datagrams, mut receives) = (Vec::new(), Vec::new());
    while datagrams.len() < SIZES.len() {
        let r = poll_fn(|cx| socket.poll_recv(cx, &mut buf)).await.expect("receive");
        for d in r.datagrams(&buf) {
            assert!(d.iter().all(|&b| b == d[0]), "a datagram mixes two segments");
            datagrams.push((d.len(), d[0]));
        }
        receives.push(r);
    }
    (datagrams, receives)
}

async fn coalesced_datagrams_come_back_one_by_one<R: Runtime>(runtime: &R) {
    let socket = runtime.bind_udp("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let to = socket.local_addr().expect("local addr");
    // The kernel turns on receive timestamps for the whole stack a moment after the first
    // socket asks (a deferred static key): until then a datagram is stamped when it is read,
    // so the first rounds may show no queueing.
    let mut ages = Vec::new();
    for _ in 0..20 {
        send_segmented(to);
        std::thread::sleep(QUEUED);
        let (datagrams, receives) = receive_all(&socket).await;
        let expected: Vec<_> = SIZES.iter().enumerate().map(|(i, &n)| (n, i as u8)).collect();
        assert_eq!(datagrams, expected, "receives: {receives:?}");
        let age = |r: &Received| r.age.unwrap_or_else(|| panic!("no kernel timestamp: {r:?}"));
        let round: Vec<Duration> = receives.iter().map(age).collect();
        if round.iter().all(|&a| a >= QUEUED) {
            assert!(round.iter().all(|&a| a < QUEUED + Duration::from_secs(5)), "ages {round:?}");
            return;
        }
        ages.push(round);
    }
    panic!("the receives' ages never included the {QUEUED:?} queued: {ages:?}");
}

#[test]
fn tokio_coalesced_datagrams_come_back_one_by_one() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        coalesced_datagrams_come_back_one_by_one(&whep_tokio::TokioRuntime::current()).await;
    });
}

#[test]
fn smol_coalesced_datagrams_come_back_one_by_one() {
    smol::block_on(coalesced_datagrams_come_back_one_by_one(&whep_smol::SmolRuntime::global()));
}

#[test]
fn received_splits_by_stride_and_ages_from_the_timestamp() {
    let from: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let buf = [1u8; 10];
    let r = Received { len: 10, from, stride: 4, age: None };
    assert_eq!(r.datagrams(&buf).map(<[u8]>::len).collect::<Vec<_>>(), [4, 4, 2]);
    assert_eq!(Received::datagram(7, from).datagrams(&buf).count(), 1);
    // A length past the buffer (a truncated receive) is cut to it.
    let r = Received { len: 64, from, stride: 64, age: None };
    assert_eq!(r.datagrams(&buf).map(<[u8]>::len).collect::<Vec<_>>(), [10]);
    let epoch = std::time::SystemTime::UNIX_EPOCH;
    let at = |s: u64| epoch + Duration::from_secs(s);
    let aged = Received::datagram(1, from).timestamped(Some(Duration::from_secs(10)), at(12));
    assert_eq!(aged.age, Some(Duration::from_secs(2)));
    let future = Received::datagram(1, from).timestamped(Some(Duration::from_secs(13)), at(12));
    assert_eq!(future.age, Some(Duration::ZERO));
    assert_eq!(Received::datagram(1, from).timestamped(None, at(12)).age, None);
}
