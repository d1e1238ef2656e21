//! The coordinator's tasks, and the term they belong to.
//!
//! A group's leader runs one coordinator per term, on the process's runtime
//! beside the servers that carry its transactions. When the term ends (the
//! replica is deposed, cut off, or a replicated write failed), everything
//! that term started must stop with it: the actor, its Prepare streams,
//! Commit senders and redelivery sleeps, the pruner, the ring's migration
//! task. Every coordinator task is started with [`spawn`], which ties it to
//! the [`Term`] it was started in (and every task that one starts, in turn);
//! [`Term::end`] stops them all at their next await, as a runtime's
//! shutdown would. A single coordinator has no term: its tasks live as long
//! as the process.
//!
//! A runtime per term did the same with less code, but every request then
//! crossed between the process's runtime (where the servers read it) and the
//! term's (where the actor answers it): a wake-up of another thread each
//! way. docs/performance.md has the figures.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

tokio::task_local! {
    static TERM: CancellationToken;
}

/// A leader's term: what its tasks are tied to. Dropping it ends it.
pub(crate) struct Term {
    scope: Scope,
    ended: DropGuard,
}

impl Term {
    pub fn new() -> Term {
        let token = CancellationToken::new();
        Term { ended: token.clone().drop_guard(), scope: Scope(token) }
    }

    /// Where work runs within this term.
    pub fn scope(&self) -> Scope {
        self.scope.clone()
    }

    /// Stops every task of this term at its next await.
    pub fn end(self) {
        drop(self.ended);
    }
}

/// Runs work within a [`Term`]; it does not keep the term going.
#[derive(Clone)]
pub(crate) struct Scope(CancellationToken);

impl Scope {
    /// `work` within this term, wherever it is polled: every task it
    /// spawns (with [`spawn`]) is the term's.
    pub fn within<F: Future>(&self, work: F) -> impl Future<Output = F::Output> {
        TERM.scope(self.0.clone(), work)
    }

    /// Spawns `task` within this term ([`spawn`]).
    pub fn spawn<F>(&self, task: F) -> JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        TERM.sync_scope(self.0.clone(), || spawn(task))
    }
}

/// Spawns `task` on the current runtime, within the term of the task that
/// spawns it, if any: it stops when that term ends.
pub(crate) fn spawn<F>(task: F) -> JoinHandle<Option<F::Output>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match TERM.try_with(CancellationToken::clone) {
        #[allow(clippy::disallowed_methods)] // the one place that spawns
        Ok(term) => tokio::spawn(TERM.scope(term.clone(), async move {
            tokio::select! {
                biased;
                () = term.cancelled() => None,
                done = task => Some(done),
            }
        })),
        #[allow(clippy::disallowed_methods)]
        Err(_) => tokio::spawn(async move { Some(task.await) }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// A task that counts its ticks in `outer` forever, and spawns another
    /// that counts its own in `nested`.
    async fn ticking(outer: Arc<AtomicUsize>, nested: Arc<AtomicUsize>) {
        spawn(async move {
            loop {
                nested.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        loop {
            outer.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Waits (10 s at most) until `ticks` has counted `more` beyond `from`.
    async fn ticked(ticks: &AtomicUsize, from: usize, more: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while ticks.load(Ordering::SeqCst) < from + more {
            assert!(tokio::time::Instant::now() < deadline, "no progress in 10 s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn count() -> Arc<AtomicUsize> {
        Arc::new(AtomicUsize::new(0))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_terms_tasks_and_theirs_stop_when_it_ends_and_no_others() {
        let (mine, my_nested, other, other_nested) = (count(), count(), count(), count());
        let term = Term::new();
        let handle = term.scope().spawn(ticking(mine.clone(), my_nested.clone()));
        let outside = spawn(ticking(other.clone(), other_nested.clone()));
        ticked(&mine, 0, 2).await;
        ticked(&my_nested, 0, 2).await;
        term.end();
        assert_eq!(handle.await.unwrap(), None, "the term's task was stopped, not finished");
        // A nested task mid-poll when the term ended finishes that poll: let
        // the runtime take a few turns before reading where they stopped.
        ticked(&other, other.load(Ordering::SeqCst), 5).await;
        let stopped = (mine.load(Ordering::SeqCst), my_nested.load(Ordering::SeqCst));
        // The window in which nothing of the ended term may run: twenty more
        // ticks of each task of no term.
        ticked(&other, other.load(Ordering::SeqCst), 20).await;
        ticked(&other_nested, other_nested.load(Ordering::SeqCst), 20).await;
        assert_eq!(
            (mine.load(Ordering::SeqCst), my_nested.load(Ordering::SeqCst)),
            stopped,
            "nothing of the ended term runs on, nested tasks included"
        );
        outside.abort();
    }

    #[tokio::test]
    async fn a_dropped_term_ends_too_and_a_task_that_finishes_first_gives_its_output() {
        let term = Term::new();
        let done = term.scope().spawn(async { 7 }).await.unwrap();
        assert_eq!(done, Some(7));
        let waiting = term.scope().spawn(std::future::pending::<()>());
        drop(term);
        assert_eq!(waiting.await.unwrap(), None);
    }
}
