//! Group commit: high-rate writes from many tasks are queued here and
//! applied by one writer in batches, one transaction per batch. A caller
//! that must not answer before its write is durable awaits the commit;
//! others just queue. Consecutive records of one task in a batch collapse
//! to the last, so a task that goes PENDING → RUNNING → STOPPED within a
//! batch costs one row write.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::db::{StateStore, Write};
use crate::error::{ApiError, Result};

/// At most this many writes share one transaction: large enough to carry
/// thousands of task transitions per second, small enough that one commit
/// stays in the low milliseconds.
const MAX_BATCH: usize = 4096;

type Ack = oneshot::Sender<std::result::Result<(), String>>;

/// The queue in front of the store.
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    queue: mpsc::UnboundedSender<(Vec<Write>, Option<Ack>)>,
}

impl Writer {
    /// Starts the writer task over `store`.
    pub(crate) fn start(store: Arc<dyn StateStore>) -> (Writer, tokio::task::JoinHandle<()>) {
        let (queue, rx) = mpsc::unbounded_channel();
        let join = tokio::spawn(run(store, rx));
        (Writer { queue }, join)
    }

    /// Queues writes without waiting for them.
    pub(crate) fn send(&self, write: Write) {
        let _ = self.queue.send((vec![write], None));
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
        let _ = self.queue.send((writes, Some(ack)));
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

async fn run(
    store: Arc<dyn StateStore>,
    mut rx: mpsc::UnboundedReceiver<(Vec<Write>, Option<Ack>)>,
) {
    let mut writes = Vec::new();
    let mut acks = Vec::new();
    while let Some((first, ack)) = rx.recv().await {
        writes.extend(first);
        acks.extend(ack);
        while writes.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok((more, ack)) => {
                    writes.extend(more);
                    acks.extend(ack);
                }
                Err(_) => break,
            }
        }
        let batch = collapse(std::mem::take(&mut writes));
        let result = if batch.is_empty() {
            Ok(())
        } else {
            store.write(&batch).await.map_err(|e| e.to_string())
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, writes = batch.len(), "state batch failed");
        }
        for ack in acks.drain(..) {
            let _ = ack.send(result.clone());
        }
    }
}

/// Keeps only the last record of each task, in order of first appearance.
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
