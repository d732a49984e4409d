//! A minimal runtime-agnostic async queue (std only): many senders, one receiver, optional
//! capacity with drop-oldest overflow. Enough for the driver's jobs, process exits, replies and
//! event subscriptions, without tying the driver to any runtime's channels.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

#[derive(Debug)]
struct State<T> {
    items: VecDeque<T>,
    waker: Option<Waker>,
    /// No more items will come (all senders gone, or closed explicitly).
    closed: bool,
    /// The receiver is gone; sends fail.
    receiver_gone: bool,
    senders: usize,
    /// Most items kept; the oldest is dropped beyond it. `None` = unbounded.
    capacity: Option<usize>,
}

#[derive(Debug)]
struct Shared<T> {
    state: Mutex<State<T>>,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding this lock cannot leave the queue inconsistent (every update is
        // a single push, pop or flag write), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The sending half. Cloneable.
#[derive(Debug)]
pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// The receiving half.
#[derive(Debug)]
pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

/// A queue; with `capacity`, a full queue drops its oldest item to take a new one.
pub(crate) fn channel<T>(capacity: Option<usize>) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            waker: None,
            closed: false,
            receiver_gone: false,
            senders: 1,
            capacity,
        }),
    });
    (Sender { shared: Arc::clone(&shared) }, Receiver { shared })
}

/// Why [`Sender::send_within`] gave an item back.
#[derive(Debug)]
pub(crate) enum Full<T> {
    /// The queue held the limit already.
    Full(T),
    /// The receiver is gone.
    Closed(T),
}

impl<T> Sender<T> {
    /// Queues `item` unless `limit` items wait already (or the receiver is gone).
    pub(crate) fn send_within(&self, item: T, limit: usize) -> Result<(), Full<T>> {
        let waker = {
            let mut s = self.shared.lock();
            if s.receiver_gone || s.closed {
                return Err(Full::Closed(item));
            }
            if s.items.len() >= limit {
                return Err(Full::Full(item));
            }
            s.items.push_back(item);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Whether the receiver is gone (or the queue closed): nothing sent arrives any more.
    pub(crate) fn is_closed(&self) -> bool {
        let s = self.shared.lock();
        s.receiver_gone || s.closed
    }

    /// Queues `item`; gives it back when the receiver is gone.
    pub(crate) fn send(&self, item: T) -> Result<(), T> {
        let waker = {
            let mut s = self.shared.lock();
            if s.receiver_gone || s.closed {
                return Err(item);
            }
            if s.capacity.is_some_and(|c| s.items.len() >= c) {
                s.items.pop_front();
            }
            s.items.push_back(item);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Self { shared: Arc::clone(&self.shared) }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut s = self.shared.lock();
            s.senders -= 1;
            if s.senders == 0 {
                s.closed = true;
                s.waker.take()
            } else {
                None
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Receiver<T> {
    /// The next item; `Ready(None)` once every sender is gone and the queue is empty.
    pub(crate) fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut s = self.shared.lock();
        if let Some(item) = s.items.pop_front() {
            return Poll::Ready(Some(item));
        }
        if s.closed {
            return Poll::Ready(None);
        }
        match &mut s.waker {
            Some(w) => w.clone_from(cx.waker()),
            None => s.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Waits for the next item; `None` once every sender is gone and the queue is empty.
    pub(crate) async fn recv(&self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        s.receiver_gone = true;
        s.items.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn poll<T>(rx: &Receiver<T>) -> Poll<Option<T>> {
        rx.poll_recv(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn delivers_in_order_then_closes() {
        let (tx, rx) = channel(None);
        let tx2 = tx.clone();
        assert!(tx.send(1).is_ok() && tx2.send(2).is_ok());
        assert_eq!(poll(&rx), Poll::Ready(Some(1)));
        assert_eq!(poll(&rx), Poll::Ready(Some(2)));
        assert_eq!(poll(&rx), Poll::Pending);
        drop(tx);
        assert_eq!(poll(&rx), Poll::Pending, "one sender left");
        drop(tx2);
        assert_eq!(poll(&rx), Poll::Ready(None));
    }

    #[test]
    fn bounded_drops_oldest_and_send_fails_without_receiver() {
        let (tx, rx) = channel(Some(2));
        for i in 0..5 {
            assert!(tx.send(i).is_ok());
        }
        assert_eq!(poll(&rx), Poll::Ready(Some(3)));
        assert_eq!(poll(&rx), Poll::Ready(Some(4)));
        drop(rx);
        assert_eq!(tx.send(9), Err(9));
    }

    #[test]
    fn send_wakes_the_receiver() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        let (tx, rx) = channel::<u8>(None);
        assert!(rx.poll_recv(&mut Context::from_waker(&waker)).is_pending());
        assert!(tx.send(7).is_ok());
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    }
}
