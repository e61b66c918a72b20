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

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Most payload bytes one `sendmsg` may carry in a batch: an IPv4 packet's 65,535 bytes less
/// its 20-byte IP and 8-byte UDP headers (the segments travel as one packet until split).
const BATCH_MAX: usize = 65_507;

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
