//! Waiting on NCCL without hanging: a status source is polled until it is done, fails, or the deadline passes.
//! Separate from the FFI so the waiting itself is tested without a GPU.

use std::time::{Duration, Instant};

use crate::Error;

/// One look at an asynchronous operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll {
    Pending,
    Done,
    Failed(String),
}

/// Polls `status` (first at once, then with a back-off from 20 µs to 1 ms, so short operations are not slowed) until
/// it is done or failed, or `timeout` has passed.
pub fn await_done(what: &str, timeout: Duration, mut status: impl FnMut() -> Poll) -> Result<(), Error> {
    let start = Instant::now();
    let mut pause = Duration::from_micros(20);
    loop {
        match status() {
            Poll::Done => return Ok(()),
            Poll::Failed(code) => return Err(Error::Nccl { what: what.to_string(), code }),
            Poll::Pending => {}
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return Err(Error::Timeout { what: what.to_string(), after: elapsed });
        }
        std::thread::sleep(pause.min(timeout - elapsed));
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_that_never_answers_times_out_on_time() {
        let start = Instant::now();
        let err = await_done("joining", Duration::from_millis(150), || Poll::Pending).unwrap_err();
        let took = start.elapsed();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert!(took >= Duration::from_millis(150) && took < Duration::from_millis(400), "{took:?}");
        assert!(err.to_string().starts_with("joining timed out after"), "{err}");
    }

    #[test]
    fn a_failure_ends_the_wait_and_names_the_operation() {
        let mut n = 0;
        let err = await_done("the broadcast", Duration::from_secs(10), || {
            n += 1;
            if n < 5 {
                Poll::Pending
            } else {
                Poll::Failed("ncclRemoteError (a peer failed)".into())
            }
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "the broadcast failed: ncclRemoteError (a peer failed)");
        assert_eq!(n, 5);
    }

    #[test]
    fn done_returns_at_once() {
        let start = Instant::now();
        await_done("x", Duration::ZERO, || Poll::Done).unwrap();
        assert!(start.elapsed() < Duration::from_millis(5));
    }
}
