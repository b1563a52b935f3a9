//! NCCL bootstrap through the coordinator (its `NcclRendezvous`): the root of a GPU broadcast group posts its NCCL
//! unique id, the other ranks fetch it. Groups live in the leader's memory for ten minutes (a communicator is built within seconds of its
//! id; a lost leader means the group is rebuilt with a fresh id anyway).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tonic::Status;

/// Bytes in an ncclUniqueId.
pub const UNIQUE_ID_LEN: usize = 128;
const KEEP: Duration = Duration::from_secs(600);
const MAX_WAIT: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct Rendezvous {
    groups: Mutex<HashMap<String, (Vec<u8>, u32, Instant)>>,
    posted: Notify,
}

impl Rendezvous {
    /// Rank 0 posts `unique_id` for `group` of `world` ranks (posting again replaces it: a rebuilt communicator);
    /// any other rank waits up to `wait` for it. Returns the id and the group's size.
    pub async fn meet(
        &self,
        group: &str,
        rank: u32,
        world: u32,
        unique_id: Vec<u8>,
        wait: Duration,
    ) -> Result<(Vec<u8>, u32), Status> {
        if group.is_empty() || world == 0 || rank >= world {
            return Err(Status::invalid_argument(format!(
                "an NCCL rendezvous needs a group name and a rank below the world size (rank {rank} of {world})"
            )));
        }
        if rank == 0 {
            if unique_id.len() != UNIQUE_ID_LEN {
                return Err(Status::invalid_argument(format!(
                    "rank 0 posts the {UNIQUE_ID_LEN}-byte NCCL unique id; got {} bytes",
                    unique_id.len()
                )));
            }
            let mut groups = self.groups.lock().expect("groups");
            groups.retain(|_, (_, _, at)| at.elapsed() < KEEP);
            groups.insert(group.to_string(), (unique_id.clone(), world, Instant::now()));
            drop(groups);
            self.posted.notify_waiters();
            return Ok((unique_id, world));
        }
        let deadline = Instant::now() + wait.min(MAX_WAIT);
        loop {
            let posted = self.posted.notified();
            if let Some((id, w, _)) = self.groups.lock().expect("groups").get(group).cloned() {
                if w != world {
                    return Err(Status::invalid_argument(format!(
                        "group {group:?} has {w} ranks; rank {rank} asked for {world}"
                    )));
                }
                return Ok((id, w));
            }
            if tokio::time::timeout_at(deadline.into(), posted).await.is_err() {
                return Err(Status::deadline_exceeded(format!(
                    "no root posted NCCL group {group:?} within {:?}",
                    wait.min(MAX_WAIT)
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn ranks_get_the_roots_id_whenever_they_ask() {
        let r = Arc::new(Rendezvous::default());
        let id: Vec<u8> = (0..128u8).collect();
        // Rank 1 asks before the root posts and waits; rank 2 asks after.
        let early = {
            let r = r.clone();
            tokio::spawn(async move { r.meet("g", 1, 3, vec![], Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(r.meet("g", 0, 3, id.clone(), Duration::ZERO).await.unwrap(), (id.clone(), 3));
        assert_eq!(early.await.unwrap().unwrap(), (id.clone(), 3));
        assert_eq!(r.meet("g", 2, 3, vec![], Duration::ZERO).await.unwrap().0, id);
    }

    #[tokio::test]
    async fn bad_requests_and_absent_roots_are_named() {
        let r = Rendezvous::default();
        let e = r.meet("g", 0, 2, vec![1, 2, 3], Duration::ZERO).await.unwrap_err();
        assert!(e.message().contains("128-byte") && e.message().contains("got 3 bytes"), "{e}");
        let e = r.meet("g", 2, 2, vec![], Duration::ZERO).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let start = Instant::now();
        let e = r.meet("nobody", 1, 2, vec![], Duration::from_millis(100)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::DeadlineExceeded);
        assert!(start.elapsed() >= Duration::from_millis(100) && start.elapsed() < Duration::from_secs(2));
        r.meet("g", 0, 2, vec![7; 128], Duration::ZERO).await.unwrap();
        let e = r.meet("g", 1, 4, vec![], Duration::ZERO).await.unwrap_err();
        assert!(e.message().contains("has 2 ranks"), "{e}");
    }
}
