//! Who drives the ring: the callers themselves, with the ring thread covering the rest.
//!
//! A caller whose command is queued takes it into the engine and submits the ops at once,
//! on its own thread ([`Pump::kick`]). While it waits for its reply it drives the ring
//! ([`Pump::step`]): one waiting caller at a time is the *reaper*, which polls the completion
//! queue for the poll window (`window.rs`), then waits for the ring's descriptor to turn
//! readable in the caller's own reactor, and feeds the completions back.
//! The kernel posts a completion from the thread that submitted it, so a caller that submits
//! and reaps its own request never hands it to another thread.
//!
//! Commands queued while the reaper is *awake* (between its turns, not asleep in the
//! reactor) and the stream is sequential are left to its next turn ([`Hub::kick`]): the
//! callers woken by one batch of completions queue their next requests, and one turn takes
//! them all in, their adjacent reads and writes joined into one entry each (`join.rs`).
//! The reaper takes in what was left before it sleeps or lets go of the role
//! ([`Hub::doze`]); a reaper nobody polls leaves it to the ring thread's look (below).
//!
//! The ring thread covers what no caller waits for: ops of futures dropped before their
//! reply, write-back after the last reply, the close after the last handle. It reaps (in
//! `io_uring_enter`) only while I/O is in flight and nobody is the reaper, and lets go of the
//! role after each batch so that a waiting caller can take it. While a caller is the reaper
//! it looks in every 10 ms and reaps whatever is ready, so a reaper whose future is not
//! polled slows the others down but never stalls them. It also ends the loop once the image
//! is closed or every handle is gone.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_io::Async;
use event_listener::Event;
use qcow2_async::{Pump, Step};
use qcow2_sync::Error;
use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};

use crate::ring::{AbortOnUnwind, Loop};
use crate::window::Window;

/// How often the ring thread looks in while a caller is the reaper.
const WATCH: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 10_000_000,
};

/// The state callers and the ring thread share.
pub(crate) struct Hub {
    /// The loop; `None` before it is installed and after it ended.
    state: Mutex<Option<Loop>>,
    /// A duplicate of the ring's descriptor: the reaper's reactor watches it, the ring
    /// thread waits on it in `io_uring_enter`.
    ring: Async<OwnedFd>,
    /// Whether someone (a caller or the ring thread) is the reaper.
    reaper: AtomicBool,
    /// Set while the reaper is a caller that turns the loop again before it sleeps or lets
    /// go of the role: a command queued meanwhile waits for that turn (see `kick`).
    awake: AtomicBool,
    /// Set by a kick that left its command to the awake reaper.
    deferred: AtomicBool,
    /// The loop's [`Loop::sequential`], readable without the lock.
    sequential: AtomicBool,
    /// Signalled when the reaper lets go of the role.
    reaper_free: Event,
    /// The loop's ops in flight, readable without the lock.
    inflight: AtomicUsize,
    /// The ring thread's doorbell (an eventfd).
    bell: OwnedFd,
    /// Set once the reactor failed to watch the ring (callers then leave all reaping to the
    /// ring thread).
    no_reactor: AtomicBool,
    /// Set while the ring thread sleeps without looking in: a caller that finds the reaper
    /// role taken rings the bell then, so that a reaper nobody polls is watched over.
    unwatched: AtomicBool,
    /// How long the reaper polls the completion queue before it waits in the reactor.
    window: Window,
}

fn runtime_error(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Runtime { what, source }
}

impl Hub {
    /// A hub for the ring whose descriptor is `ring_fd`; the loop comes with [`install`](Self::install).
    pub(crate) fn new(ring_fd: impl AsFd, poll_max: Duration) -> Result<Arc<Self>, Error> {
        let dup = rustix::io::fcntl_dupfd_cloexec(ring_fd, 0)
            .map_err(|e| runtime_error("duplicating the ring's descriptor")(e.into()))?;
        let ring = Async::new_nonblocking(dup).map_err(runtime_error(
            "registering the ring with the async-io reactor",
        ))?;
        let bell = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| runtime_error("eventfd")(e.into()))?;
        Ok(Arc::new(Self {
            state: Mutex::new(None),
            ring,
            reaper: AtomicBool::new(false),
            awake: AtomicBool::new(false),
            deferred: AtomicBool::new(false),
            sequential: AtomicBool::new(false),
            reaper_free: Event::new(),
            inflight: AtomicUsize::new(0),
            bell,
            unwatched: AtomicBool::new(false),
            no_reactor: AtomicBool::new(false),
            window: Window::new(poll_max),
        }))
    }

    pub(crate) fn install(&self, l: Loop) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = Some(l);
    }

    /// One turn of the loop (see [`Loop::turn`]); returns whether it answered a request.
    /// Rings the ring thread's bell when the loop may end.
    fn turn(&self, reap: bool) -> bool {
        let _abort = AbortOnUnwind::new();
        // (Cleared before the commands are taken: a kick after this is seen later.)
        self.deferred.store(false, Ordering::SeqCst);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(l) = state.as_mut() else {
            return false;
        };
        let answered = l.turn(reap);
        self.inflight.store(l.inflight(), Ordering::SeqCst);
        self.sequential.store(l.sequential(), Ordering::Relaxed);
        if l.finished() {
            self.ring_bell();
        }
        answered
    }

    /// A command was queued: take it in now, unless an awake reaper is about to and the
    /// stream is sequential. Commands of callers woken by one batch of completions then go
    /// into the engine in one turn and to the kernel with one `io_uring_enter`, adjacent
    /// ones joined into one entry. (Random requests go at once: held, they would only wait.)
    fn kick(&self) {
        if self.sequential.load(Ordering::Relaxed) && self.awake.load(Ordering::SeqCst) {
            self.deferred.store(true, Ordering::SeqCst);
            // The reaper clears `awake` before it looks at `deferred` (`doze`): if it was
            // still set after our mark, the reaper sees the mark.
            if self.awake.load(Ordering::SeqCst) {
                return;
            }
        }
        self.turn(false);
    }

    /// The reaper is about to sleep or let go of the role: takes in what kicks left to it.
    /// Returns whether there was any.
    fn doze(&self) -> bool {
        self.awake.store(false, Ordering::SeqCst);
        let any = self.deferred.load(Ordering::SeqCst);
        if any {
            self.turn(false);
        }
        any
    }

    fn take_reaper(&self) -> bool {
        self.reaper
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Lets go of the reaper role: to a waiting caller, else (with I/O in flight) to the
    /// ring thread.
    fn release_reaper(&self) {
        self.reaper.store(false, Ordering::SeqCst);
        if self.reaper_free.notify(1) == 0 {
            self.leave();
        }
    }

    /// Rings the bell when I/O is in flight and nobody reaps or waits to.
    fn leave(&self) {
        if self.inflight.load(Ordering::SeqCst) > 0
            && !self.reaper.load(Ordering::SeqCst)
            && self.reaper_free.total_listeners() == 0
        {
            self.ring_bell();
        }
    }

    fn ring_bell(&self) {
        let _ = rustix::io::write(&self.bell, &1u64.to_ne_bytes());
    }

    /// A caller's step: become the reaper (or wait until the role is free), then reap until
    /// the caller has its reply (the caller then drops this future, letting go of the role).
    async fn step(&self) {
        if self.no_reactor.load(Ordering::Relaxed) {
            return self.leave_to_ring_thread().await;
        }
        // (Listening only when the role is taken: a release before the listener was in
        // place is seen by the second look.)
        while !self.take_reaper() {
            let free = self.reaper_free.listen();
            if self.take_reaper() {
                break;
            }
            if self.unwatched.swap(false, Ordering::SeqCst) {
                self.ring_bell();
            }
            free.await;
        }
        let role = Role(self);
        self.awake.store(true, Ordering::SeqCst);
        loop {
            // (First: completions may have come while nobody reaped.)
            if self.turn(true) {
                // The caller looks for its reply before this goes on (it is polled first).
                futures_lite::future::yield_now().await;
                continue;
            }
            let waited = Instant::now();
            match self.poll_ring().await {
                Polled::Commands => continue,
                Polled::Completions => {}
                Polled::Nothing => {
                    if self.doze() {
                        self.awake.store(true, Ordering::SeqCst);
                        continue;
                    }
                    if self.ring.readable().await.is_err() {
                        self.no_reactor.store(true, Ordering::Relaxed);
                        drop(role);
                        return self.leave_to_ring_thread().await;
                    }
                    self.awake.store(true, Ordering::SeqCst);
                }
            }
            self.window.record(waited.elapsed());
        }
    }

    /// Looks at the completion queue and for commands left to the reaper, yielding to the
    /// executor between looks, for as long as the poll window. (A look skips while someone
    /// else holds the loop: a caller submitting is never made to wait for it.)
    async fn poll_ring(&self) -> Polled {
        let window = self.window.get();
        if window.is_zero() {
            return Polled::Nothing;
        }
        let start = Instant::now();
        loop {
            futures_lite::future::yield_now().await;
            if self.deferred.load(Ordering::SeqCst) {
                return Polled::Commands;
            }
            if let Ok(mut state) = self.state.try_lock() {
                if state.as_mut().is_some_and(Loop::has_completions) {
                    return Polled::Completions;
                }
            }
            if start.elapsed() >= window {
                return Polled::Nothing;
            }
        }
    }

    /// The reactor failed to watch the ring: the ring thread reaps for everyone from now
    /// on, and callers just wait for their replies.
    async fn leave_to_ring_thread(&self) {
        self.ring_bell();
        std::future::pending().await
    }
}

/// What the reaper's polling found.
enum Polled {
    Completions,
    /// Commands that kicks left to the reaper.
    Commands,
    /// Nothing within the poll window.
    Nothing,
}

/// The reaper role, let go on drop (also when the caller's future is dropped).
struct Role<'a>(&'a Hub);

impl Drop for Role<'_> {
    fn drop(&mut self) {
        self.0.doze();
        self.0.release_reaper();
    }
}

/// The [`Pump`] the handles hold.
pub(crate) struct RingPump(pub(crate) Arc<Hub>);

impl Pump for RingPump {
    fn kick(&self) {
        self.0.kick();
    }

    fn step(&self) -> Option<Step<'_>> {
        Some(Box::pin(self.0.step()))
    }

    fn leave(&self) {
        self.0.leave();
    }
}

/// The ring thread's body: runs until the loop is finished, then shuts it down.
pub(crate) fn run(hub: Arc<Hub>) {
    let _abort = AbortOnUnwind::new();
    loop {
        hub.turn(true);
        let (finished, inflight) = {
            let state = hub.state.lock().unwrap_or_else(PoisonError::into_inner);
            state
                .as_ref()
                .map_or((true, 0), |l| (l.finished(), l.inflight()))
        };
        if finished {
            break;
        }
        if inflight > 0 && hub.take_reaper() {
            wait_ring(&hub);
            hub.turn(true);
            hub.reaper.store(false, Ordering::SeqCst);
            hub.reaper_free.notify(1);
            continue;
        }
        // Looks in while anything is in flight or a caller reaps; else sleeps until the
        // bell (announced first, then checked again: a caller taking the role meanwhile
        // either is seen here or sees the announcement).
        let watch = || hub.inflight.load(Ordering::SeqCst) > 0 || hub.reaper.load(Ordering::SeqCst);
        let mut watching = inflight > 0 || watch();
        if !watching {
            hub.unwatched.store(true, Ordering::SeqCst);
            watching = watch();
        }
        wait_bell(&hub, watching);
        hub.unwatched.store(false, Ordering::SeqCst);
    }
    let l = hub
        .state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let Some(l) = l {
        l.shutdown();
    }
}

/// Sleeps in the kernel until a completion is ready.
fn wait_ring(hub: &Hub) {
    // The submitter reads no queue state (nothing is submitted), so it may run beside a lock
    // holder pushing entries.
    let r = crate::ring::wait_for_completion(hub.ring.get_ref());
    if let Err(e) = r {
        if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) {
            panic!("io_uring_enter failed: {e}");
        }
    }
}

/// Sleeps until the bell rings (with a look every [`WATCH`] while `watch`).
fn wait_bell(hub: &Hub, watch: bool) {
    let mut fds = [PollFd::new(&hub.bell, PollFlags::IN)];
    loop {
        match poll(&mut fds, watch.then_some(&WATCH)) {
            // Interrupted (a completion's task work ran here): sleep on.
            Err(rustix::io::Errno::INTR) => continue,
            Ok(0) => return,
            _ => break,
        }
    }
    let mut b = [0u8; 8];
    let _ = rustix::io::read(&hub.bell, &mut b);
}
