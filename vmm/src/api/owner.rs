//! How a request reaches the VM's owner: the API's client threads send each one, with a
//! channel for its answer, over a channel and wake the owner's event loop with an eventfd
//! (as Cloud Hypervisor and Firecracker do). The owner answers requests one at a time on
//! its own thread, so no request races another over the VM.

use std::os::fd::AsRawFd;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::protocol::{Request, Response};

/// A request and where its answer goes.
struct Call {
    request: Request,
    answer: Sender<Response>,
}

/// The client side: hands requests to the owner and waits for the answers. Cloned into
/// every client thread.
#[derive(Clone)]
pub struct ToOwner {
    calls: Sender<Call>,
    wake: Arc<EventFd>,
}

/// The owner side: the calls not yet answered, and the eventfd that announces them.
pub struct Calls {
    calls: Receiver<Call>,
    wake: Arc<EventFd>,
}

/// A connected pair.
pub fn channel() -> std::io::Result<(ToOwner, Calls)> {
    let (tx, rx) = mpsc::channel();
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    Ok((
        ToOwner {
            calls: tx,
            wake: wake.clone(),
        },
        Calls { calls: rx, wake },
    ))
}

impl ToOwner {
    /// Asks the owner and waits for its answer. Once the owner has stopped (the VM is
    /// ending) the answer says so instead.
    pub fn call(&self, request: Request) -> Response {
        let gone = || Response::error("the VM is shutting down");
        let (answer, answered) = mpsc::channel();
        if self.calls.send(Call { request, answer }).is_err() {
            return gone();
        }
        if let Err(e) = self.wake.write(1) {
            tracing::warn!("cannot wake the VM's owner for an API request: {e}");
        }
        answered.recv().unwrap_or_else(|_| gone())
    }
}

impl Calls {
    /// Answers every waiting call with `answer`.
    pub fn answer_all(&self, mut answer: impl FnMut(Request) -> Response) {
        // Reset the counter first: a call sent after this is announced again.
        let _ = self.wake.read();
        while let Ok(call) = self.calls.try_recv() {
            let response = answer(call.request);
            // The client may have gone; its answer is then dropped.
            let _ = call.answer.send(response);
        }
    }
}

/// The owner's event-loop subscriber: answers calls from the VM's [`Machine`].
///
/// [`Machine`]: crate::machine::Machine
pub struct Owner {
    calls: Calls,
    vm: Arc<crate::machine::Machine>,
}

impl Owner {
    /// Answers `calls` from `vm`.
    pub fn new(calls: Calls, vm: Arc<crate::machine::Machine>) -> Self {
        Owner { calls, vm }
    }
}

impl MutEventSubscriber for Owner {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.calls.wake.as_raw_fd(), EventSet::IN)) {
            tracing::error!("the control API cannot reach the VM: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let vm = &self.vm;
        self.calls
            .answer_all(|request| super::handle::handle(request, vm));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_answered_in_order_and_fail_once_the_owner_is_gone() {
        let (to, calls) = channel().unwrap();
        let client = {
            let to = to.clone();
            std::thread::spawn(move || {
                let a = to.call(Request::Info {});
                let b = to.call(Request::Pause {});
                (a, b)
            })
        };
        let mut seen = Vec::new();
        while seen.len() < 2 {
            calls.answer_all(|r| {
                seen.push(r.clone());
                Response::error(format!("{r:?}"))
            });
            std::thread::yield_now();
        }
        let (a, b) = client.join().unwrap();
        assert_eq!(seen, vec![Request::Info {}, Request::Pause {}]);
        assert_eq!(a.error.as_deref(), Some("Info"));
        assert_eq!(b.error.as_deref(), Some("Pause"));
        drop(calls);
        let gone = to.call(Request::Info {});
        assert_eq!(gone.error.as_deref(), Some("the VM is shutting down"));
    }
}
