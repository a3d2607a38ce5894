//! Group commit: high-rate writes from many tasks are queued here and
//! applied by one writer in batches, one transaction per batch. A caller
//! that must not answer before its write is durable awaits the commit;
//! others just queue. Consecutive records of one task in a batch collapse
//! to the last, so a task that goes PENDING → RUNNING → STOPPED within a
//! batch costs one row write.

use std::collections::HashMap;
use std::sync::Arc;
#[cfg(test)]
use std::time::Duration;

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

type Ack = oneshot::Sender<std::result::Result<(), String>>;
type Item = (Vec<Write>, Option<Ack>);

/// The queue in front of the store.
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    queue: std::sync::mpsc::Sender<Item>,
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
    /// writer writes there; other stores through the current runtime).
    /// The thread ends once every `Writer` is dropped.
    pub(crate) fn start(store: Arc<dyn StateStore>) -> std::io::Result<Writer> {
        let sink = match store.batch_writer() {
            Some(sink) => sink,
            None => Box::new(OnRuntime(store, tokio::runtime::Handle::current())),
        };
        let (queue, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("wharf-writer".into())
            .spawn(move || run(sink, rx))?;
        Ok(Writer { queue })
    }

    fn push(&self, item: Item) {
        // A send fails only once the writer has ended (shutdown); the ack
        // is then dropped, which its waiter sees as "stopped".
        let _ = self.queue.send(item);
    }

    /// Queues writes without waiting for them.
    pub(crate) fn send(&self, write: Write) {
        self.push((vec![write], None));
    }

    /// Queues writes and waits until they (and everything queued before
    /// them) are committed.
    pub(crate) async fn commit(&self, writes: Vec<Write>) -> Result<()> {
        self.queue_acked(writes).wait().await
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
/// transaction and answers every waiter with the result.
fn run(mut sink: Box<dyn BatchWriter>, rx: std::sync::mpsc::Receiver<Item>) {
    use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
    let mut writes = Vec::new();
    let mut acks = Vec::new();
    while let Ok((first, ack)) = rx.recv() {
        writes.extend(first);
        acks.extend(ack);
        let mut deadline = None;
        while writes.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok((more, ack)) => {
                    writes.extend(more);
                    acks.extend(ack);
                }
                Err(TryRecvError::Empty) if acks.is_empty() => {
                    let until = *deadline.get_or_insert_with(|| std::time::Instant::now() + LINGER);
                    let left = until.saturating_duration_since(std::time::Instant::now());
                    match rx.recv_timeout(left) {
                        Ok((more, ack)) => {
                            writes.extend(more);
                            acks.extend(ack);
                        }
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                    }
                }
                Err(_) => break,
            }
        }
        let batch = collapse(std::mem::take(&mut writes));
        let result = if batch.is_empty() {
            Ok(())
        } else {
            sink.write(&batch)
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, writes = batch.len(), "state batch failed");
        }
        for ack in acks.drain(..) {
            let _ = ack.send(result.clone());
        }
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
    use std::sync::Mutex;
    use std::sync::mpsc;

    use super::*;
    use crate::db::tests::task;
    use crate::model::TaskStatus;

    /// Records each batch as `id:STATUS` strings; the first batch waits
    /// for a go, so what is queued meanwhile forms the next one.
    struct Recorder {
        batches: Batches,
        go: Option<mpsc::Receiver<()>>,
    }

    impl BatchWriter for Recorder {
        fn write(&mut self, batch: &[Write]) -> std::result::Result<(), String> {
            if let Some(go) = self.go.take() {
                go.recv().unwrap();
            }
            let names = batch
                .iter()
                .map(|w| match w {
                    Write::Task(t) => format!("{}:{}", t.id, t.status.as_str()),
                    _ => "other".into(),
                })
                .collect();
            self.batches.lock().unwrap().push(names);
            Ok(())
        }
    }

    type Batches = Arc<Mutex<Vec<Vec<String>>>>;

    fn writer() -> (Writer, Batches, mpsc::Sender<()>) {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let (go_tx, go) = mpsc::channel();
        let sink = Recorder {
            batches: batches.clone(),
            go: Some(go),
        };
        let (queue, rx) = mpsc::channel();
        std::thread::spawn(move || run(Box::new(sink), rx));
        (Writer { queue }, batches, go_tx)
    }

    #[tokio::test]
    async fn writes_queued_during_a_commit_form_the_next_batch_one_row_per_task() {
        let (writer, batches, go) = writer();
        let first = writer.queue_acked(vec![Write::Task(Box::new(task("x", TaskStatus::Running)))]);
        // The first commit is under way (its sink waits): these queue.
        std::thread::sleep(Duration::from_millis(20));
        writer.send(Write::Task(Box::new(task("a", TaskStatus::Pending))));
        writer.send(Write::Task(Box::new(task("b", TaskStatus::Pending))));
        writer.send(Write::Task(Box::new(task("a", TaskStatus::Running))));
        let last = writer.queue_acked(vec![Write::Task(Box::new(task("a", TaskStatus::Stopped)))]);
        go.send(()).unwrap();
        first.wait().await.unwrap();
        last.wait().await.unwrap();
        let batches = batches.lock().unwrap().clone();
        assert_eq!(
            batches,
            vec![
                vec!["x:RUNNING".to_owned()],
                vec!["b:PENDING".to_owned(), "a:STOPPED".to_owned()],
            ]
        );
    }

    #[tokio::test]
    async fn a_write_nobody_waits_for_is_committed_soon_after_its_linger() {
        let (writer, batches, go) = writer();
        go.send(()).unwrap();
        writer.send(Write::Task(Box::new(task("a", TaskStatus::Pending))));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while batches.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never committed");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(batches.lock().unwrap()[0], vec!["a:PENDING".to_owned()]);
    }

    #[tokio::test]
    async fn a_dropped_writer_ends_its_thread_and_a_failed_batch_fails_its_waiters() {
        struct Failing;
        impl BatchWriter for Failing {
            fn write(&mut self, _: &[Write]) -> std::result::Result<(), String> {
                Err("disk full".into())
            }
        }
        let (queue, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || run(Box::new(Failing), rx));
        let writer = Writer { queue };
        let result = writer
            .queue_acked(vec![Write::Task(Box::new(task("a", TaskStatus::Stopped)))])
            .0
            .await
            .expect("an answer, not a dropped waiter");
        assert_eq!(result, Err("disk full".to_owned()));
        drop(writer);
        thread.join().unwrap();
    }
}
