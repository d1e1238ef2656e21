//! The writer's queue: requests in call order, and a writer woken only when
//! what it waits for has come.
//!
//! A channel wakes its receiver on every send. The writer, gathering company
//! for an fsync, waits for a number of requests (or an urgent one) and has
//! nothing to do with each single arrival; woken by each, it went to sleep
//! and was woken again per request, a context switch each time, on two
//! saturated cores. Here a sender wakes the writer only when the queue holds
//! what the writer said it waits for.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{urgent, Durability, LogError, Request};

/// Most requests queued before a sender must wait for room.
const LIMIT: usize = 65_536;

struct Shared {
    state: Mutex<State>,
    /// The writer waits here for requests.
    arrived: Condvar,
    /// Senders wait here for room.
    room: Condvar,
}

struct State {
    requests: VecDeque<Request>,
    /// Live [`Sender`]s: the writer stops once none is left and the queue is empty.
    senders: usize,
    /// The writer is gone: nothing queued will be written.
    closed: bool,
    /// The writer sleeps until the queue holds this many requests
    /// (`usize::MAX`: it is not asleep, and no sender wakes it).
    wake_at: usize,
    /// The writer sleeps until a [`Durability::Synced`] request comes, too.
    wake_on_urgent: bool,
    /// Senders asleep until there is room.
    blocked: usize,
    /// Times a sender woke the writer.
    wakes: u64,
}

/// Why a request was not queued; the request comes back.
pub(super) enum SendError {
    Full(Request),
    Closed(Request),
}

/// The callers' end: one per [`super::Log`] handle.
pub(super) struct Sender(Arc<Shared>);

/// The writer's end. Dropping it (the writer returned or panicked) closes the
/// queue: later sends fail, and requests still queued hear [`LogError::Closed`].
pub(super) struct Receiver(Arc<Shared>);

pub(super) fn queue() -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            requests: VecDeque::new(),
            senders: 1,
            closed: false,
            wake_at: usize::MAX,
            wake_on_urgent: false,
            blocked: 0,
            wakes: 0,
        }),
        arrived: Condvar::new(),
        room: Condvar::new(),
    });
    (Sender(Arc::clone(&shared)), Receiver(shared))
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A panic while the lock is held leaves the state whole (each change
    // is one push or pop), so a poisoned lock is taken as it is.
    shared.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Sender {
    /// Queues `request` unless the queue is full or closed.
    pub(super) fn try_send(&self, request: Request) -> Result<(), SendError> {
        let state = lock(&self.0);
        if state.closed {
            return Err(SendError::Closed(request));
        }
        if state.requests.len() >= LIMIT {
            return Err(SendError::Full(request));
        }
        self.push(state, request);
        Ok(())
    }

    /// Queues `request`, waiting for room while the queue is full.
    pub(super) fn send(&self, request: Request) -> Result<(), Request> {
        let mut state = lock(&self.0);
        while !state.closed && state.requests.len() >= LIMIT {
            state.blocked += 1;
            state = self.0.room.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
            state.blocked -= 1;
        }
        if state.closed {
            return Err(request);
        }
        self.push(state, request);
        Ok(())
    }

    fn push(&self, mut state: MutexGuard<'_, State>, request: Request) {
        let urgent = request.durability == Durability::Synced;
        state.requests.push_back(request);
        let wake = state.requests.len() >= state.wake_at || (urgent && state.wake_on_urgent);
        if wake {
            state.wake_at = usize::MAX;
            state.wake_on_urgent = false;
            state.wakes += 1;
        }
        drop(state);
        if wake {
            self.0.arrived.notify_one();
        }
    }
}

impl Clone for Sender {
    fn clone(&self) -> Sender {
        lock(&self.0).senders += 1;
        Sender(Arc::clone(&self.0))
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let mut state = lock(&self.0);
        state.senders -= 1;
        let last = state.senders == 0;
        drop(state);
        if last {
            self.0.arrived.notify_one();
        }
    }
}

impl Receiver {
    /// Waits for at least one request and moves up to `max` into `group`;
    /// false once every sender is gone and nothing is queued.
    pub(super) fn recv(&self, group: &mut Vec<Request>, max: usize) -> bool {
        let mut state = lock(&self.0);
        while state.requests.is_empty() {
            if state.senders == 0 {
                return false;
            }
            state.wake_at = 1;
            state = self.0.arrived.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
            state.wake_at = usize::MAX;
        }
        self.take(&mut state, group, max);
        true
    }

    /// Moves queued requests into `group` until it holds `enough`, or, with
    /// `stop_on_urgent`, a [`Durability::Synced`] one (the group then ends
    /// there), waiting for more until `deadline`; never more than `max`.
    /// Without `stop_on_urgent`, whatever is queued when the writer wakes
    /// comes along, beyond `enough` too. The writer is woken only when the
    /// queue holds what is missing or an urgent request comes, not at each
    /// arrival. With `pause`, it also stops once no request came for that
    /// long: the company it waits for is not on its way.
    pub(super) fn gather(
        &self,
        group: &mut Vec<Request>,
        enough: usize,
        max: usize,
        stop_on_urgent: bool,
        deadline: Instant,
        pause: Option<Duration>,
    ) {
        let enough = enough.min(max);
        let mut state = lock(&self.0);
        let (mut had, mut since) = (group.len(), Instant::now());
        loop {
            if stop_on_urgent {
                while group.len() < max && !urgent(group) {
                    let Some(next) = state.requests.pop_front() else { break };
                    group.push(next);
                }
                self.made_room(&state);
            } else {
                self.take(&mut state, group, max);
            }
            if group.len() >= enough || (stop_on_urgent && urgent(group)) || state.senders == 0 {
                return;
            }
            let now = Instant::now();
            if group.len() > had {
                (had, since) = (group.len(), now);
            }
            let until = match pause {
                Some(pause) if now >= since + pause => return,
                Some(pause) => deadline.min(since + pause),
                None => deadline,
            };
            if now >= until {
                return;
            }
            state.wake_at = enough - group.len();
            state.wake_on_urgent = stop_on_urgent;
            state = match self.0.arrived.wait_timeout(state, until - now) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
            state.wake_at = usize::MAX;
            state.wake_on_urgent = false;
        }
    }

    /// Moves what is queued into `group`, up to `max` in it.
    fn take(&self, state: &mut State, group: &mut Vec<Request>, max: usize) {
        let count = state.requests.len().min(max.saturating_sub(group.len()));
        group.extend(state.requests.drain(..count));
        self.made_room(state);
    }

    /// Wakes the senders waiting for room, if there is room now.
    fn made_room(&self, state: &State) {
        if state.blocked > 0 && state.requests.len() < LIMIT {
            self.0.room.notify_all();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut state = lock(&self.0);
        state.closed = true;
        let queued = std::mem::take(&mut state.requests);
        let blocked = state.blocked > 0;
        drop(state);
        if blocked {
            self.0.room.notify_all();
        }
        // Outside the lock: a request's `done` may run code of its own.
        for request in queued {
            request.done.finish(Err(LogError::Closed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::Done;
    use std::time::Duration;

    fn request(durability: Durability, id: u8, heard: &Arc<Mutex<Vec<(u8, bool)>>>) -> Request {
        let heard = Arc::clone(heard);
        let done = Done::Call(Box::new(move |result| heard.lock().unwrap().push((id, result.is_ok()))));
        Request { writes: vec![crate::log::Write::Put { key: vec![id], value: vec![] }], durability, done }
    }

    fn ids(group: &[Request]) -> Vec<u8> {
        group
            .iter()
            .map(|r| match &r.writes[0] {
                crate::log::Write::Put { key, .. } => key[0],
                _ => unreachable!("only puts are queued here"),
            })
            .collect()
    }

    /// Waits until the writer sleeps in a wait: what a sender sees then is
    /// what it would see under load.
    fn until_asleep(queue: &Sender) {
        let since = Instant::now();
        while lock(&queue.0).wake_at == usize::MAX {
            assert!(since.elapsed() < Duration::from_secs(10), "the writer never waited");
            std::thread::yield_now();
        }
    }

    fn wakes(queue: &Sender) -> u64 {
        lock(&queue.0).wakes
    }

    /// A writer taking what is queued, then gathering company up to
    /// `enough` (a long deadline: only company ends the wait).
    fn gathering(
        writer: Receiver,
        enough: usize,
        stop_on_urgent: bool,
    ) -> std::thread::JoinHandle<(Vec<Request>, Receiver)> {
        std::thread::spawn(move || {
            let mut group = Vec::new();
            assert!(writer.recv(&mut group, 100));
            writer.gather(
                &mut group,
                enough,
                100,
                stop_on_urgent,
                Instant::now() + Duration::from_secs(30),
                None,
            );
            (group, writer)
        })
    }

    #[test]
    fn a_gathering_writer_is_woken_once_when_its_company_has_come_not_at_each_arrival() {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let (queue, writer) = queue();
        queue.try_send(request(Durability::Synced, 0, &heard)).ok().unwrap();
        let gathering = gathering(writer, 5, false);
        for id in 1..4 {
            until_asleep(&queue);
            queue.try_send(request(Durability::Synced, id, &heard)).ok().unwrap();
            assert_eq!(wakes(&queue), 0, "arrival {id} of the 4 missing woke the writer");
        }
        until_asleep(&queue);
        queue.try_send(request(Durability::Synced, 4, &heard)).ok().unwrap();
        assert_eq!(wakes(&queue), 1, "the arrival that completes the group wakes the writer");
        let (group, _writer) = gathering.join().unwrap();
        assert_eq!(ids(&group), [0, 1, 2, 3, 4], "in call order");
    }

    #[test]
    fn an_urgent_write_ends_a_wait_for_company_of_writes_that_may_wait() {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let (queue, writer) = queue();
        queue.try_send(request(Durability::SyncedSoon, 0, &heard)).ok().unwrap();
        let gathering = gathering(writer, 100, true);
        until_asleep(&queue);
        queue.try_send(request(Durability::Buffered, 1, &heard)).ok().unwrap();
        queue.try_send(request(Durability::SyncedSoon, 2, &heard)).ok().unwrap();
        assert_eq!(wakes(&queue), 0, "writes that may wait do not wake it");
        queue.try_send(request(Durability::Synced, 3, &heard)).ok().unwrap();
        let (group, writer) = gathering.join().unwrap();
        assert_eq!(wakes(&queue), 1);
        assert_eq!(ids(&group), [0, 1, 2, 3], "the group ends at the urgent write");
        queue.try_send(request(Durability::Buffered, 4, &heard)).ok().unwrap();
        let mut next = Vec::new();
        assert!(writer.recv(&mut next, 100));
        assert_eq!(ids(&next), [4]);
    }

    #[test]
    fn a_wait_for_company_ends_at_its_deadline_with_what_came() {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let (queue, writer) = queue();
        queue.try_send(request(Durability::Synced, 0, &heard)).ok().unwrap();
        queue.try_send(request(Durability::Synced, 1, &heard)).ok().unwrap();
        let mut group = Vec::new();
        assert!(writer.recv(&mut group, 1));
        assert_eq!(ids(&group), [0], "no more than asked for");
        writer.gather(&mut group, 16, 100, false, Instant::now() + Duration::from_millis(20), None);
        assert_eq!(ids(&group), [0, 1]);
        assert_eq!(wakes(&queue), 0);
    }

    #[test]
    fn a_wait_for_company_goes_on_while_it_comes_and_ends_once_none_came_for_the_pause() {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let (queue, writer) = queue();
        queue.try_send(request(Durability::Synced, 0, &heard)).ok().unwrap();
        let mut group = Vec::new();
        assert!(writer.recv(&mut group, 100));
        // Ten more arrive 5 ms apart, each well within the pause of the one
        // before; then nothing: the company of 100 waited for never comes.
        let sender = {
            let (queue, heard) = (queue.clone(), Arc::clone(&heard));
            std::thread::spawn(move || {
                for id in 1..=10 {
                    std::thread::sleep(Duration::from_millis(5));
                    queue.try_send(request(Durability::Synced, id, &heard)).ok().unwrap();
                }
            })
        };
        let started = Instant::now();
        let deadline = started + Duration::from_secs(60);
        writer.gather(&mut group, 100, 100, false, deadline, Some(Duration::from_secs(1)));
        sender.join().unwrap();
        assert_eq!(ids(&group), (0..=10).collect::<Vec<u8>>(), "every arrival within the pause came along");
        assert!(started.elapsed() < Duration::from_secs(30), "the pause ended the wait, not the deadline");
    }

    #[test]
    fn the_writer_stops_once_every_sender_is_gone_and_the_queue_is_drained() {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let (queue, writer) = queue();
        let other = queue.clone();
        queue.try_send(request(Durability::Buffered, 0, &heard)).ok().unwrap();
        drop(queue);
        let mut group = Vec::new();
        assert!(writer.recv(&mut group, 100), "a sender is left");
        assert_eq!(ids(&group), [0]);
        let stopping = std::thread::spawn(move || writer.recv(&mut Vec::new(), 100));
        std::thread::sleep(Duration::from_millis(20));
        drop(other);
        assert!(!stopping.join().unwrap(), "no sender left and nothing queued");
    }

    #[test]
    fn a_closed_queue_refuses_and_finishes_what_it_held_with_an_error() {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let (queue, writer) = queue();
        queue.try_send(request(Durability::Synced, 0, &heard)).ok().unwrap();
        drop(writer);
        assert_eq!(*heard.lock().unwrap(), [(0, false)], "the queued request hears the close");
        match queue.try_send(request(Durability::Synced, 1, &heard)) {
            Err(SendError::Closed(_)) => {}
            _ => panic!("a closed queue took a request"),
        }
        assert!(queue.send(request(Durability::Synced, 2, &heard)).is_err());
    }

    #[test]
    fn a_full_queue_refuses_a_try_and_a_blocked_send_goes_once_there_is_room() {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let (queue, writer) = queue();
        for _ in 0..LIMIT {
            queue.try_send(request(Durability::Buffered, 0, &heard)).ok().unwrap();
        }
        assert!(matches!(queue.try_send(request(Durability::Buffered, 1, &heard)), Err(SendError::Full(_))));
        let blocked = queue.clone();
        let sending =
            std::thread::spawn(move || blocked.send(request(Durability::Buffered, 2, &heard)).is_ok());
        while lock(&queue.0).blocked == 0 {
            std::thread::yield_now();
        }
        let mut group = Vec::new();
        assert!(writer.recv(&mut group, 10));
        assert!(sending.join().unwrap(), "the blocked send went once the writer took some");
        assert_eq!(lock(&queue.0).requests.len(), LIMIT - 10 + 1);
    }
}
