//! Leader election for coordinators, through etcd's election API.
//!
//! A candidate holds a lease (`ttl`), kept alive in the background, and campaigns under
//! `{prefix}/election/coordinator`; the winner's value is its address, so followers can tell clients where to go.
//! The winner's election key at its creation revision is a [`Fence`]: with it set on the store, every lineage write
//! is conditional on still holding the key, so a leader that lost its lease (paused, partitioned) can no longer write
//! once another has taken over.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tokio::sync::watch;

use crate::{Error, Fence, Result};

fn unavailable(e: etcd_client::Error) -> Error {
    Error::Unavailable(format!("etcd election: {e}"))
}

pub struct Candidate {
    client: Client,
    name: String,
    value: String,
    ttl: i64,
}

/// Leadership won by [`Candidate::campaign`]; `lost` turns true when the lease could not be kept alive.
pub struct Leadership {
    pub fence: Fence,
    pub lease: i64,
    pub lost: watch::Receiver<bool>,
}

impl Candidate {
    /// `value` is what followers report as the leader (its address); `ttl` the lease in seconds (failover time).
    pub async fn connect(endpoints: &[String], prefix: &str, value: &str, ttl: i64) -> Result<Self> {
        let opts =
            // No request timeout: a campaign blocks for as long as another candidate leads.
            ConnectOptions::new().with_connect_timeout(Duration::from_secs(3));
        let client = Client::connect(endpoints, Some(opts)).await.map_err(unavailable)?;
        let name = format!("{}/election/coordinator", prefix.trim_end_matches('/'));
        Ok(Self { client, name, value: value.to_string(), ttl: ttl.max(1) })
    }

    /// Waits until this candidate leads.
    pub async fn campaign(&self) -> Result<Leadership> {
        let mut lease_client = self.client.lease_client();
        let lease = lease_client.grant(self.ttl, None).await.map_err(unavailable)?.id();
        let (lost_tx, lost) = watch::channel(false);
        let (keeper, stream) = lease_client.keep_alive(lease).await.map_err(unavailable)?;
        let every = Duration::from_millis((self.ttl as u64 * 1000 / 3).max(100));
        let ttl = Duration::from_secs(self.ttl as u64);
        let keepalive = tokio::spawn(async move {
            let mut channel = Some((keeper, stream));
            let mut last_ok = std::time::Instant::now();
            loop {
                // A broken keep-alive stream (its etcd member died) is opened again, maybe on another member; the
                // lease is lost only when no keep-alive got through for a whole TTL.
                // Bounded by what is left of the TTL: unbounded, a reopen in a partition hangs and the cut-off
                // leader never steps down; bounded tighter, a reopen that needs a while to find a live member (its
                // first pick was the dead one) never succeeds and a healthy leader steps down.
                if channel.is_none() {
                    let left = ttl.saturating_sub(last_ok.elapsed()).max(Duration::from_millis(100));
                    channel =
                        tokio::time::timeout(left, lease_client.keep_alive(lease)).await.ok().and_then(|r| r.ok());
                }
                let ok = match channel.as_mut() {
                    Some((keeper, stream)) => {
                        let alive = async {
                            keeper.keep_alive().await?;
                            Ok::<_, etcd_client::Error>(stream.message().await?.map(|r| r.ttl()))
                        };
                        match tokio::time::timeout(every, alive).await {
                            Ok(Ok(Some(t))) if t > 0 => true,
                            Ok(Ok(Some(_))) => {
                                // etcd says the lease is gone: no retry can bring it back.
                                last_ok = std::time::Instant::now() - ttl;
                                false
                            }
                            _ => false,
                        }
                    }
                    None => false,
                };
                if ok {
                    last_ok = std::time::Instant::now();
                } else {
                    channel = None;
                    if last_ok.elapsed() >= ttl {
                        tracing::error!("coordinator lease {lease:x} lost: no keep-alive got through for {ttl:?}");
                        let _ = lost_tx.send(true);
                        return;
                    }
                    tracing::warn!("coordinator lease {lease:x}: keep-alive failed, trying again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                tokio::time::sleep(every).await;
            }
        });
        let mut election = self.client.election_client();
        let won = match election.campaign(self.name.as_str(), self.value.as_str(), lease).await {
            Ok(w) => w,
            Err(e) => {
                // Give the lease back rather than leave it to expire, and stop keeping it alive.
                keepalive.abort();
                let _ = self.client.lease_client().revoke(lease).await;
                return Err(unavailable(e));
            }
        };
        let key = won.leader().ok_or_else(|| Error::Unavailable("campaign returned no leader key".into()))?;
        let fence = Fence { key: String::from_utf8_lossy(key.key()).into_owned(), revision: key.rev() };
        Ok(Leadership { fence, lease, lost })
    }

    /// The current leader's value (address), if there is one.
    pub async fn leader(&self) -> Result<Option<String>> {
        let mut election = self.client.election_client();
        let asked = tokio::time::timeout(Duration::from_secs(2), election.leader(self.name.as_str()));
        let answer = asked.await.map_err(|_| Error::Unavailable("etcd election: leader query timed out".into()))?;
        match answer {
            Ok(r) => Ok(r.kv().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
            // No leader yet is reported as an error by etcd.
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("no leader") => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }
}
