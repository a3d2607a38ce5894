//! Group commit: high-rate writes from many tasks are queued here and
//! applied by one writer in batches, one transaction per batch. A caller
//! that must not answer before its write is durable awaits the commit;
//! others just queue. Consecutive records of one task in a batch collapse
//! to the last, so a task that goes PENDING → RUNNING → STOPPED within a
//! batch costs one row write.
//!
//! A commit somebody waits for is written on the waiter's own thread when
//! the writer is idle and the store writes synchronously (SQLite, its
//! connection free): a lone request then costs no hand-off to the
//! writer's thread and back — two cross-thread wake-ups, 20–60 µs each on
//! a small VM. Idle means: no batch being written, none ended within
//! [`IDLE_FOR`], the last one ended with nothing queued behind it and the
//! thread's last answered at most one waiter, and few writes queued.
//! Under load none of that holds and the thread's larger batches carry
//! every commit (a caller's thread writing a batch of one would cost
//! more per write, and hold an API or guest thread). Whoever writes holds
//! the queue's `writing` mark and takes everything queued before it, so
//! batches still commit in queue order.
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
#[cfg(test)]
use std::time::Duration;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::db::{BatchWriter, StateStore, Write};
use crate::error::{ApiError, Result};

/// At most this many writes share one transaction: large enough to carry
/// thousands of task transitions per second, small enough that one commit
/// stays in the low milliseconds.
const MAX_BATCH: usize = 4096;

/// How long writes nobody waits for may sit in the queue for company: a
/// task's intermediate records (placed, `PENDING`, `RUNNING`) then share
/// the commit of its final one, or of the next write somebody waits for,
/// instead of costing a commit each. Nothing acknowledged waits for this.
const LINGER: std::time::Duration = std::time::Duration::from_millis(2);

/// The most writes a caller writes on its own thread: a lone request's
/// few. More queued means load, where the thread's larger batches cost
/// less per write and the callers' threads (the API's, the guests') are
/// better spent on requests and tasks.
const INLINE_MAX: usize = 16;

/// How long the writer must have been idle for a caller to write on its
/// own thread: under load, batches follow one another closer than this.
const IDLE_FOR: std::time::Duration = std::time::Duration::from_micros(100);

type Ack = oneshot::Sender<std::result::Result<(), String>>;
type Item = (Vec<Write>, Option<Ack>);

/// The queue in front of the store. The writer's thread ends once every
/// clone is dropped, after writing what is queued.
#[derive(Clone)]
pub(crate) struct Writer {
    shared: Arc<Shared>,
    _alive: Arc<Alive>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("inline", &self.shared.inline)
            .finish_non_exhaustive()
    }
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer's thread: something to write was queued, or a
    /// caller's write ended with more queued behind it.
    wake: Condvar,
    /// Used by whoever holds `State::writing`, so never contended.
    sink: Mutex<Box<dyn BatchWriter>>,
    /// Callers may write on their own thread ([`BatchWriter::write_now`]).
    inline: bool,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Item>,
    /// Writes in `queue`.
    writes: usize,
    /// Waiters in `queue`.
    acks: usize,
    /// A batch is being written; nobody else takes from the queue.
    writing: bool,
    /// More was queued when the last batch ended: under load, the
    /// thread's batches carry it; callers do not write on their threads.
    busy: bool,
    /// Waiters the thread's last batch answered: more than one means
    /// concurrent callers, whose commits share the thread's batches
    /// (written on a caller's thread, the first would commit alone).
    crowd: usize,
    /// When the last batch ended: a commit soon after one is load too.
    ended: Option<Instant>,
    /// Waiters of commits with nothing of their own to write, made while
    /// a batch was being written and nothing else was queued: everything
    /// before them is in that batch, so its result is theirs.
    riders: Vec<Ack>,
    /// Every handle is gone: the thread writes what is left and ends.
    closed: bool,
    /// The thread waits on `wake` (a notification is a system call: it
    /// is made only when someone listens).
    sleeping: bool,
    /// The thread has ended (a panic in a write): nothing is queued any
    /// more, so every waiter hears at once that the writer stopped.
    dead: bool,
}

impl State {
    fn push_back(&mut self, item: Item) {
        self.writes += item.0.len();
        self.acks += usize::from(item.1.is_some());
        self.queue.push_back(item);
    }

    fn push_front(&mut self, item: Item) {
        self.writes += item.0.len();
        self.acks += usize::from(item.1.is_some());
        self.queue.push_front(item);
    }

    /// Takes items from the front, at most [`MAX_BATCH`] writes (or one
    /// larger item): usually the whole queue at once, so the lock is
    /// held for no copying ([`flatten`] them after releasing it).
    fn take(&mut self) -> VecDeque<Item> {
        if self.writes <= MAX_BATCH {
            self.writes = 0;
            self.acks = 0;
            return std::mem::take(&mut self.queue);
        }
        let mut taken = VecDeque::new();
        let mut writes = 0;
        while let Some((next, _)) = self.queue.front() {
            if writes > 0 && writes + next.len() > MAX_BATCH {
                break;
            }
            let item = self.queue.pop_front().expect("a front item");
            writes += item.0.len();
            self.writes -= item.0.len();
            self.acks -= usize::from(item.1.is_some());
            taken.push_back(item);
        }
        taken
    }
}

/// A batch's writes, in order, and its waiters.
fn flatten(items: VecDeque<Item>) -> (Vec<Write>, Vec<Ack>) {
    let (mut writes, mut acks) = (Vec::new(), Vec::new());
    for (more, ack) in items {
        writes.extend(more);
        acks.extend(ack);
    }
    (writes, acks)
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sink(&self) -> MutexGuard<'_, Box<dyn BatchWriter>> {
        self.sink.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Releases the queue and wakes the thread if it waits: it re-reads
    /// the queue under the lock before every wait, so one that does not
    /// wait sees the change.
    fn wake_thread(&self, st: MutexGuard<'_, State>) {
        let sleeping = st.sleeping;
        drop(st);
        if sleeping {
            self.wake.notify_one();
        }
    }

    /// Waits on `wake`, for at most `limit`.
    fn sleep<'a>(
        &self,
        mut st: MutexGuard<'a, State>,
        limit: Option<std::time::Duration>,
    ) -> MutexGuard<'a, State> {
        st.sleeping = true;
        let mut st = match limit {
            None => self.wake.wait(st).unwrap_or_else(|p| p.into_inner()),
            Some(limit) => {
                self.wake
                    .wait_timeout(st, limit)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        };
        st.sleeping = false;
        st
    }
}

/// Held while writing a batch: gives `writing` back (also if the write
/// panics, whose waiters then see the writer stopped) and wakes the
/// thread if more was queued meanwhile.
struct Writing<'a>(&'a Shared);

impl Writing<'_> {
    /// Ends the write: the riders to answer with its result (taken in
    /// the same hold of the lock that gives `writing` back, so no rider
    /// joins a write that has ended). `thread`: the waiters of the
    /// thread's batch (not a caller's), for `crowd`.
    fn end(self, thread: Option<usize>) -> Vec<Ack> {
        let shared = self.0;
        std::mem::forget(self);
        let mut st = shared.state();
        st.writing = false;
        st.ended = Some(Instant::now());
        let riders = std::mem::take(&mut st.riders);
        if let Some(acks) = thread {
            st.crowd = acks + riders.len();
        }
        st.busy = !st.queue.is_empty();
        if st.busy {
            shared.wake_thread(st);
        }
        riders
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state();
        st.writing = false;
        // A write that panicked: its riders' waiters see the writer stopped.
        st.riders.clear();
        st.busy = !st.queue.is_empty();
        if st.busy {
            self.0.wake_thread(st);
        }
    }
}

/// Marks the thread's end, also by a panic: what is queued then is
/// dropped (its waiters see the writer stopped) and nothing more queues.
struct Gone<'a>(&'a Shared);

impl Drop for Gone<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state();
        st.dead = true;
        st.queue.clear();
        st.riders.clear();
        (st.writes, st.acks) = (0, 0);
    }
}

/// Closes the queue when the last [`Writer`] goes.
struct Alive(Arc<Shared>);

impl Drop for Alive {
    fn drop(&mut self) {
        let mut st = self.0.state();
        st.closed = true;
        self.0.wake_thread(st);
    }
}

fn answer(acks: Vec<Ack>, result: &std::result::Result<(), String>) {
    for ack in acks {
        let _ = ack.send(result.clone());
    }
}

/// A store without a synchronous writer, written from the writer's thread
/// through the runtime.
struct OnRuntime(Arc<dyn StateStore>, tokio::runtime::Handle);

impl BatchWriter for OnRuntime {
    fn write(&mut self, batch: &[Write]) -> std::result::Result<(), String> {
        self.1
            .block_on(self.0.write(batch))
            .map_err(|e| e.to_string())
    }
}

impl Writer {
    /// Starts the writer over `store` on a thread of its own (SQLite's
    /// writer writes there, or on a committing caller's thread; other
    /// stores through the current runtime).
    pub(crate) fn start(store: Arc<dyn StateStore>) -> std::io::Result<Writer> {
        let (sink, inline) = match store.batch_writer() {
            Some(sink) => (sink, true),
            None => (
                Box::new(OnRuntime(store, tokio::runtime::Handle::current()))
                    as Box<dyn BatchWriter>,
                false,
            ),
        };
        Ok(Writer::over(sink, inline)?.0)
    }

    fn over(
        sink: Box<dyn BatchWriter>,
        inline: bool,
    ) -> std::io::Result<(Writer, std::thread::JoinHandle<()>)> {
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            wake: Condvar::new(),
            sink: Mutex::new(sink),
            inline,
        });
        let thread = std::thread::Builder::new()
            .name("wharf-writer".into())
            .spawn({
                let shared = shared.clone();
                move || run(&shared)
            })?;
        let writer = Writer {
            _alive: Arc::new(Alive(shared.clone())),
            shared,
        };
        Ok((writer, thread))
    }

    /// Queues for the thread. It is woken when it must act: the queue
    /// was empty (a linger starts), somebody waits, or the batch is full;
    /// otherwise it is already lingering, or waits for a write that ends
    /// by waking it.
    fn push(&self, item: Item) {
        let mut st = self.shared.state();
        if st.dead {
            return;
        }
        let wake = st.queue.is_empty() || item.1.is_some() || st.writes + item.0.len() >= MAX_BATCH;
        st.push_back(item);
        if wake {
            self.shared.wake_thread(st);
        }
    }

    /// Queues writes without waiting for them.
    pub(crate) fn send(&self, write: Write) {
        self.push((vec![write], None));
    }

    /// Queues writes and waits until they (and everything queued before
    /// them) are committed — on this thread if nothing is being written
    /// and the store's connection is free.
    pub(crate) async fn commit(&self, writes: Vec<Write>) -> Result<()> {
        let (ack, done) = oneshot::channel();
        self.commit_here((writes, Some(ack)));
        Committed(done).wait().await
    }

    /// Writes `item` and everything queued before it on this thread, or
    /// leaves it to the writer's thread.
    fn commit_here(&self, item: Item) {
        let mut st = self.shared.state();
        if st.dead {
            return;
        }
        match item {
            (writes, Some(ack)) if writes.is_empty() && st.writing && st.queue.is_empty() => {
                st.riders.push(ack);
            }
            item => {
                st.push_back(item);
                self.write_here(st);
            }
        }
    }

    fn write_here(&self, mut st: MutexGuard<'_, State>) {
        let shared = &*self.shared;
        let alone = !st.writing
            && !st.busy
            && st.crowd <= 1
            && st.writes <= INLINE_MAX
            && st.ended.is_none_or(|at| at.elapsed() >= IDLE_FOR);
        if !shared.inline || !alone {
            shared.wake_thread(st);
            return;
        }
        st.writing = true;
        let items = st.take();
        drop(st);
        let writing = Writing(shared);
        let (writes, acks) = flatten(items);
        let batch = collapse(writes);
        let result = if batch.is_empty() {
            Some(Ok(()))
        } else {
            shared.sink().write_now(&batch)
        };
        match result {
            Some(result) => {
                if let Err(e) = &result {
                    tracing::error!(error = %e, writes = batch.len(), "state batch failed");
                }
                let riders = writing.end(None);
                answer(acks, &result);
                answer(riders, &result);
            }
            // The connection is busy: back in front, in order, for the
            // thread (which `writing`'s end wakes), riders after them.
            None => {
                let mut st = shared.state();
                let riders = std::mem::take(&mut st.riders);
                for ack in riders.into_iter().rev() {
                    st.push_front((Vec::new(), Some(ack)));
                }
                for ack in acks.into_iter().rev() {
                    st.push_front((Vec::new(), Some(ack)));
                }
                st.push_front((batch, None));
                drop(st);
                drop(writing);
            }
        }
    }

    /// Queues writes now (never blocks: callers may hold a lock, so that
    /// the order of the queue is the order of their changes) and returns
    /// what to wait on for their commit.
    pub(crate) fn queue_acked(&self, writes: Vec<Write>) -> Committed {
        let (ack, done) = oneshot::channel();
        self.push((writes, Some(ack)));
        Committed(done)
    }
}

/// The commit of queued writes, to wait for.
#[derive(Debug)]
pub(crate) struct Committed(oneshot::Receiver<std::result::Result<(), String>>);

impl Committed {
    /// Waits for the commit.
    pub(crate) async fn wait(self) -> Result<()> {
        match self.0.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ApiError::internal(format_args!("state store: {e}"))),
            Err(_) => Err(ApiError::internal("the state writer has stopped")),
        }
    }
}

/// The writer's thread: takes what is queued (up to [`MAX_BATCH`],
/// lingering while nobody waits), collapses it, writes it in one
/// transaction and answers every waiter with the result. Ends once the
/// queue is closed and empty.
fn run(shared: &Shared) {
    let _gone = Gone(shared);
    let mut st = shared.state();
    loop {
        while st.queue.is_empty() || st.writing {
            if st.closed && st.queue.is_empty() && !st.writing {
                return;
            }
            st = shared.sleep(st, None);
        }
        if st.acks == 0 && !st.closed {
            let until = Instant::now() + LINGER;
            while st.acks == 0 && st.writes < MAX_BATCH && !st.closed {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                st = shared.sleep(st, Some(left));
            }
            // A committing caller may have written it meanwhile.
            if st.writing || st.queue.is_empty() {
                continue;
            }
        }
        st.writing = true;
        let items = st.take();
        drop(st);
        let writing = Writing(shared);
        let (writes, acks) = flatten(items);
        let batch = collapse(writes);
        let result = if batch.is_empty() {
            Ok(())
        } else {
            shared.sink().write(&batch)
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, writes = batch.len(), "state batch failed");
        }
        let riders = writing.end(Some(acks.len()));
        answer(acks, &result);
        answer(riders, &result);
        st = shared.state();
    }
}

/// Keeps only the last record of each task, where that last one stands.
fn collapse(writes: Vec<Write>) -> Vec<Write> {
    let mut last: HashMap<String, usize> = HashMap::new();
    for (i, w) in writes.iter().enumerate() {
        if let Write::Task(t) = w {
            last.insert(t.id.clone(), i);
        }
    }
    writes
        .into_iter()
        .enumerate()
        .filter(|(i, w)| match w {
            Write::Task(t) => last.get(&t.id) == Some(i),
            _ => true,
        })
        .map(|(_, w)| w)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::db::tests::task;
    use crate::model::TaskStatus;

    /// Records each batch as `id:STATUS` strings with the thread that
    /// wrote it; the first batch written by `write` waits for a go, so
    /// what is queued meanwhile forms the next one. `write_now` writes
    /// unless `busy` (a prune holding the connection).
    struct Recorder {
        batches: Batches,
        go: Option<mpsc::Receiver<()>>,
        busy: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Recorder {
        fn record(&self, batch: &[Write]) {
            let names = batch
                .iter()
                .map(|w| match w {
                    Write::Task(t) => format!("{}:{}", t.id, t.status.as_str()),
                    _ => "other".into(),
                })
                .collect();
            let thread = std::thread::current().name().unwrap_or("").to_owned();
            self.batches.lock().unwrap().push((thread, names));
        }
    }

    impl BatchWriter for Recorder {
        fn write(&mut self, batch: &[Write]) -> std::result::Result<(), String> {
            if let Some(go) = self.go.take() {
                go.recv().unwrap();
            }
            self.record(batch);
            Ok(())
        }

        fn write_now(&mut self, batch: &[Write]) -> Option<std::result::Result<(), String>> {
            if self.busy.load(std::sync::atomic::Ordering::SeqCst) {
                return None;
            }
            self.record(batch);
            Some(Ok(()))
        }
    }

    type Batches = Arc<Mutex<Vec<(String, Vec<String>)>>>;

    struct Rig {
        writer: Writer,
        batches: Batches,
        go: mpsc::Sender<()>,
        busy: Arc<std::sync::atomic::AtomicBool>,
    }

    fn rig(inline: bool) -> Rig {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (go, rx) = mpsc::channel();
        let sink = Recorder {
            batches: batches.clone(),
            go: Some(rx),
            busy: busy.clone(),
        };
        let (writer, _) = Writer::over(Box::new(sink), inline).unwrap();
        Rig {
            writer,
            batches,
            go,
            busy,
        }
    }

    fn put(id: &str, status: TaskStatus) -> Write {
        Write::Task(Box::new(task(id, status)))
    }

    fn names(batches: &Batches) -> Vec<Vec<String>> {
        batches
            .lock()
            .unwrap()
            .iter()
            .map(|(_, n)| n.clone())
            .collect()
    }

    fn threads(batches: &Batches) -> Vec<String> {
        batches
            .lock()
            .unwrap()
            .iter()
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// Queues without waking the thread (as if it were asleep while this
    /// was queued): whatever writes it next is the test's to choose.
    fn queue_quietly(writer: &Writer, write: Write) {
        writer.shared.state().push_back((vec![write], None));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_queued_during_a_commit_form_the_next_batch_one_row_per_task() {
        for inline in [false, true] {
            let Rig {
                writer,
                batches,
                go,
                ..
            } = rig(inline);
            let first = writer.queue_acked(vec![put("x", TaskStatus::Running)]);
            // The first commit is under way (its sink waits): these queue,
            // and the commit somebody waits for leaves them to the thread.
            std::thread::sleep(Duration::from_millis(20));
            writer.send(put("a", TaskStatus::Pending));
            writer.send(put("b", TaskStatus::Pending));
            writer.send(put("a", TaskStatus::Running));
            let last = tokio::spawn({
                let writer = writer.clone();
                async move { writer.commit(vec![put("a", TaskStatus::Stopped)]).await }
            });
            std::thread::sleep(Duration::from_millis(20));
            go.send(()).unwrap();
            first.wait().await.unwrap();
            last.await.unwrap().unwrap();
            assert_eq!(
                names(&batches),
                vec![
                    vec!["x:RUNNING".to_owned()],
                    vec!["b:PENDING".to_owned(), "a:STOPPED".to_owned()],
                ],
                "inline {inline}"
            );
            assert_eq!(threads(&batches), ["wharf-writer", "wharf-writer"]);
        }
    }

    #[tokio::test]
    async fn a_lone_commit_is_written_on_its_callers_thread_with_what_was_queued_before() {
        let Rig {
            writer,
            batches,
            go,
            ..
        } = rig(true);
        // The thread's first write would wait for a go: never given, so
        // whatever gets written here was written on the caller's thread.
        drop(go);
        queue_quietly(&writer, put("a", TaskStatus::Provisioning));
        writer.commit(Vec::new()).await.unwrap();
        // A commit right after a batch is load: wait out the idle time.
        std::thread::sleep(IDLE_FOR);
        writer
            .commit(vec![put("b", TaskStatus::Provisioning)])
            .await
            .unwrap();
        assert_eq!(
            names(&batches),
            vec![
                vec!["a:PROVISIONING".to_owned()],
                vec!["b:PROVISIONING".to_owned()],
            ]
        );
        let me = std::thread::current().name().unwrap_or("").to_owned();
        assert_eq!(threads(&batches), [me.clone(), me]);
    }

    #[tokio::test]
    async fn a_commit_with_nothing_to_write_rides_on_the_batch_being_written() {
        let Rig {
            writer,
            batches,
            go,
            ..
        } = rig(true);
        let first = writer.queue_acked(vec![put("x", TaskStatus::Running)]);
        std::thread::sleep(Duration::from_millis(20));
        // The thread writes x (and waits for the go): a sync now needs
        // nothing but that batch.
        let sync = tokio::spawn({
            let writer = writer.clone();
            async move { writer.commit(Vec::new()).await }
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while writer.shared.state().riders.is_empty() {
            assert!(Instant::now() < deadline, "the sync never rode");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(writer.shared.state().queue.is_empty());
        assert!(!sync.is_finished(), "answered before the batch committed");
        go.send(()).unwrap();
        sync.await.unwrap().unwrap();
        first.wait().await.unwrap();
        assert_eq!(names(&batches), vec![vec!["x:RUNNING".to_owned()]]);
    }

    #[tokio::test]
    async fn after_a_batch_of_several_waiters_commits_go_to_the_thread_until_one_is_alone() {
        let Rig {
            writer,
            batches,
            go,
            ..
        } = rig(true);
        let first = writer.queue_acked(vec![put("x", TaskStatus::Running)]);
        std::thread::sleep(Duration::from_millis(20));
        // Queued while the thread writes x: its next batch has two waiters.
        let a = writer.queue_acked(vec![put("a", TaskStatus::Pending)]);
        let b = writer.queue_acked(vec![put("b", TaskStatus::Pending)]);
        go.send(()).unwrap();
        first.wait().await.unwrap();
        a.wait().await.unwrap();
        b.wait().await.unwrap();
        // Concurrent callers: this commit shares the thread's batches.
        writer
            .commit(vec![put("c", TaskStatus::Pending)])
            .await
            .unwrap();
        // That batch had one waiter: the next lone commit (after the
        // idle time) is written here.
        std::thread::sleep(IDLE_FOR);
        writer
            .commit(vec![put("d", TaskStatus::Pending)])
            .await
            .unwrap();
        assert_eq!(
            names(&batches),
            vec![
                vec!["x:RUNNING".to_owned()],
                vec!["a:PENDING".to_owned(), "b:PENDING".to_owned()],
                vec!["c:PENDING".to_owned()],
                vec!["d:PENDING".to_owned()],
            ]
        );
        let me = std::thread::current().name().unwrap_or("").to_owned();
        assert_eq!(
            threads(&batches),
            ["wharf-writer", "wharf-writer", "wharf-writer", me.as_str()]
        );
    }

    #[tokio::test]
    async fn a_busy_connection_leaves_the_commit_to_the_thread_in_order() {
        let Rig {
            writer,
            batches,
            go,
            busy,
        } = rig(true);
        go.send(()).unwrap();
        busy.store(true, std::sync::atomic::Ordering::SeqCst);
        queue_quietly(&writer, put("a", TaskStatus::Pending));
        writer
            .commit(vec![
                put("a", TaskStatus::Running),
                put("b", TaskStatus::Pending),
            ])
            .await
            .unwrap();
        assert_eq!(
            names(&batches),
            vec![vec!["a:RUNNING".to_owned(), "b:PENDING".to_owned()]]
        );
        assert_eq!(threads(&batches), ["wharf-writer"]);
    }

    #[tokio::test]
    async fn a_write_nobody_waits_for_is_committed_soon_after_its_linger() {
        let Rig {
            writer,
            batches,
            go,
            ..
        } = rig(true);
        go.send(()).unwrap();
        writer.send(put("a", TaskStatus::Pending));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while batches.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never committed");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(names(&batches)[0], vec!["a:PENDING".to_owned()]);
    }

    #[tokio::test]
    async fn a_dropped_writer_ends_its_thread_and_a_failed_batch_fails_its_waiters() {
        struct Failing;
        impl BatchWriter for Failing {
            fn write(&mut self, _: &[Write]) -> std::result::Result<(), String> {
                Err("disk full".into())
            }
            fn write_now(&mut self, _: &[Write]) -> Option<std::result::Result<(), String>> {
                Some(Err("disk full".into()))
            }
        }
        for inline in [false, true] {
            let (writer, thread) = Writer::over(Box::new(Failing), inline).unwrap();
            let (ack, done) = oneshot::channel();
            writer.commit_here((vec![put("a", TaskStatus::Stopped)], Some(ack)));
            let result = done.await.expect("an answer, not a dropped waiter");
            assert_eq!(result, Err("disk full".to_owned()));
            let queued = writer.queue_acked(vec![put("b", TaskStatus::Stopped)]);
            assert!(queued.wait().await.is_err());
            drop(writer);
            thread.join().unwrap();
        }
    }

    #[tokio::test]
    async fn a_panic_in_the_threads_write_fails_its_waiters_and_every_later_one() {
        struct Panicking;
        impl BatchWriter for Panicking {
            fn write(&mut self, _: &[Write]) -> std::result::Result<(), String> {
                panic!("a bug in a write");
            }
        }
        let (writer, thread) = Writer::over(Box::new(Panicking), false).unwrap();
        let first = writer.queue_acked(vec![put("a", TaskStatus::Stopped)]);
        assert!(first.wait().await.is_err());
        assert!(thread.join().is_err(), "the thread panicked");
        // Nothing waits forever on a writer that is gone.
        let later = tokio::time::timeout(
            Duration::from_secs(5),
            writer.commit(vec![put("b", TaskStatus::Stopped)]),
        )
        .await
        .expect("answered at once");
        assert!(later.is_err());
        writer.send(put("c", TaskStatus::Stopped));
        assert!(writer.shared.state().queue.is_empty());
    }

    #[test]
    fn what_is_queued_when_the_last_handle_goes_is_still_written() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let sink = Recorder {
            batches: batches.clone(),
            go: None,
            busy: Arc::default(),
        };
        let (writer, thread) = Writer::over(Box::new(sink), true).unwrap();
        writer.send(put("c", TaskStatus::Stopped));
        drop(writer);
        thread.join().unwrap();
        assert_eq!(names(&batches), vec![vec!["c:STOPPED".to_owned()]]);
    }
}
