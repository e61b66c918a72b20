//! The UDP socket under every quinn endpoint, with segmentation-offload batches kept within
//! what the kernel accepts.
//!
//! quinn hands the socket up to 10 datagrams at once for one `sendmsg` (UDP GSO), whatever
//! their size. The kernel refuses a batch over 64 KiB with `EMSGSIZE`, which quinn-udp takes
//! for a lost MTU probe and drops silently. Once MTU discovery raises datagrams above 6.5 KiB
//! (loopback, jumbo frames), most batches were dropped whole: quinn saw bursts of lost large
//! packets, declared the path a black hole and fell back to 1,200-byte datagrams. A 1 GiB write
//! to chunk servers on loopback then took 880,000 datagrams instead of about 17,000, and the
//! QUIC work was most of the CPU the write cost. Here such a batch goes out in pieces that fit.
//!
//! The socket's buffers are sized for bursts of whole blocks (see [`bind`]).

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::{Arc, Once};
use std::task::{Context, Poll};

/// Most payload bytes one `sendmsg` may carry in a batch: an IPv4 packet's 65,535 bytes less
/// its 20-byte IP and 8-byte UDP headers (the segments travel as one packet until split).
const BATCH_MAX: usize = 65_507;

/// Receive buffer: a whole connection receive window of stream data in flight at once.
const RECEIVE_BUFFER: usize = crate::tls::RECEIVE_WINDOW as usize;
/// Send buffer: quinn retries a batch the socket refuses with `EWOULDBLOCK`, so this only needs
/// to keep the kernel busy between two wake-ups of the sending thread.
const SEND_BUFFER: usize = 8 << 20;

/// A UDP socket on `addr` whose buffers can take bursts of whole blocks.
///
/// A 1 MiB block travels as 16 datagrams of 64 KiB on loopback, and the kernel's default
/// receive buffer (208 KiB on Debian) holds about three of them. When the receiving thread was
/// not scheduled for a moment, the kernel dropped datagrams in several separate bursts, which
/// quinn took for an MTU black hole (see the module doc): 1,200-byte datagrams for the next
/// second. Root (every Cairn server and mount) sets the sizes past `net.core.rmem_max`; anyone
/// else gets what that sysctl allows and a warning saying so.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(addr)?;
    for (forced, plain, size) in
        [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, RECEIVE_BUFFER), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, SEND_BUFFER)]
    {
        if set_option(&socket, forced, size).is_err() {
            set_option(&socket, plain, size)?;
        }
    }
    // The kernel reports twice the size it was given (the other half is its bookkeeping).
    let got = get_option(&socket, libc::SO_RCVBUF)? / 2;
    if got < RECEIVE_BUFFER {
        static WARNED: Once = Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                "UDP receive buffer is {got} bytes, not {RECEIVE_BUFFER}: bursts of large blocks may be \
                 dropped and slow transfers down; run as root or raise net.core.rmem_max to {RECEIVE_BUFFER}"
            )
        });
    }
    Ok(socket)
}

fn set_option(socket: &UdpSocket, option: libc::c_int, size: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt on a socket we own, with a c_int value and its length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn get_option(socket: &UdpSocket, option: libc::c_int) -> io::Result<usize> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt on a socket we own into a c_int with its length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 { Ok(usize::try_from(value).unwrap_or(0)) } else { Err(io::Error::last_os_error()) }
}

/// A socket that splits oversized batches (see the module doc).
#[derive(Debug)]
pub(crate) struct BoundedBatches(pub(crate) Arc<dyn AsyncUdpSocket>);

impl AsyncUdpSocket for BoundedBatches {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let Some(segment) = transmit.segment_size.filter(|_| transmit.contents.len() > BATCH_MAX) else {
            return self.0.try_send(transmit);
        };
        // If a later piece would block, quinn sends the whole batch again: the receiver
        // discards the datagrams it already has, as it does any duplicate.
        for piece in transmit.contents.chunks((BATCH_MAX / segment).max(1) * segment) {
            let segment_size = (piece.len() > segment).then_some(segment);
            self.0.try_send(&Transmit { contents: piece, segment_size, ..transmit.clone() })?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A batch of ten 30,000-byte datagrams (300 KB, over the kernel's 64 KiB limit for one
    /// `sendmsg`) arrives whole. Sent unsplit, the kernel refuses it and quinn-udp reports
    /// success, so nothing arrives.
    #[tokio::test]
    async fn oversized_batches_arrive_whole() {
        let receiver = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        receiver.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let runtime = quinn::default_runtime().unwrap();
        let sender =
            Arc::new(BoundedBatches(runtime.wrap_udp_socket(bind("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap()));
        assert!(sender.max_transmit_segments() >= 10, "this kernel has no UDP segmentation offload");
        const SEGMENT: usize = 30_000;
        let contents: Vec<u8> = (0..10 * SEGMENT).map(|i| (i / SEGMENT) as u8).collect();
        let transmit = Transmit {
            destination: receiver.local_addr().unwrap(),
            ecn: None,
            contents: &contents,
            segment_size: Some(SEGMENT),
            src_ip: None,
        };
        let mut poller = sender.clone().create_io_poller();
        std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)).await.unwrap();
        sender.try_send(&transmit).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        for i in 0..10u8 {
            let n = receiver.recv(&mut buf).unwrap_or_else(|e| panic!("datagram {i} of 10 did not arrive: {e}"));
            assert_eq!(n, SEGMENT);
            assert!(buf[..n].iter().all(|&b| b == i), "datagram {i} arrived out of order or damaged");
        }
    }
}
