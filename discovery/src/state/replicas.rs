//! Gateway replicas: a cluster may run several gateways, each its own tunnel endpoint.
//! Only one of them speaks for the cluster's origin (see [`super::Voice`]), but every
//! replica announces itself in a small *replica record* of its own: its addresses, its
//! generation, a beat that grows every gossip round, and whether it is draining. A record
//! is signed by the replica that wrote it (whichever replica speaks), relayed like any
//! origin, and expires when its beat stops growing for the discovery lease. It beats a
//! tenth of the lease apart (not every round, as origins do: a record changes rarely, and
//! each beat is a signature to make and to check), and at once when it starts draining.
//!
//! Peers dial every replica they hold a live record of; a cluster without records (one
//! gateway, or gateways of a version before replicas) is reached at its origin's address.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::model::MemberInfo;
use crate::seal::{Chain, ReplicaStatement, Seal, Sealing};

/// Names one replica: its cluster and its name within it.
pub type ReplicaKey = (String, String);

/// Held records are forgotten this many leases after their beat last grew (until then an
/// expired record is remembered, so a relay of it cannot revive it).
const FORGET_AFTER_LEASES: u32 = 10;
/// Beats per lease.
const BEATS_PER_LEASE: u32 = 10;
/// Most records of one cluster a member holds: whoever holds a cluster's key can announce
/// its replicas, but not make every member dial thousands of addresses.
pub const MAX_PER_CLUSTER: usize = 16;

/// What a member holds of one replica, summarised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplicaDigest {
    /// The replica's generation.
    pub generation: u64,
    /// Its beat.
    pub beat: u64,
    /// Fingerprint of its certificate held (0: none).
    pub cert: u64,
}

/// One replica's own record, as it signed it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaRecord {
    /// Its name within the cluster (`info.cluster`).
    pub replica: String,
    /// Its cluster, locality and addresses.
    pub info: MemberInfo,
    /// Start-up epoch: a restart picks a larger one.
    pub generation: u64,
    /// Grows every gossip round.
    pub beat: u64,
    /// It takes no new connections (it is shutting down).
    pub draining: bool,
    /// Its signature over the record.
    pub seal: Option<Seal>,
    /// The certificate that verifies it, when the receiver may lack it.
    pub chain: Option<Chain>,
}

impl ReplicaRecord {
    fn key(&self) -> ReplicaKey {
        (self.info.cluster.clone(), self.replica.clone())
    }

    fn statement(&self, cert: u64) -> ReplicaStatement<'_> {
        ReplicaStatement {
            cluster: &self.info.cluster,
            replica: &self.replica,
            generation: self.generation,
            beat: self.beat,
            info: &self.info,
            draining: self.draining,
            cert,
        }
    }

    fn digest(&self) -> ReplicaDigest {
        ReplicaDigest {
            generation: self.generation,
            beat: self.beat,
            cert: self.chain.as_ref().map_or(0, |c| c.fingerprint),
        }
    }

    fn newer_than(&self, d: &ReplicaDigest) -> bool {
        (self.generation, self.beat) > (d.generation, d.beat)
    }

    /// The record for a peer holding `theirs`: the chain only when it holds another.
    fn for_peer(&self, theirs: Option<&ReplicaDigest>) -> ReplicaRecord {
        let mut r = self.clone();
        r.chain = r
            .chain
            .filter(|c| theirs.is_none_or(|d| d.cert != c.fingerprint));
        r
    }
}

/// A replica as this member sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaView {
    /// Its name within its cluster.
    pub replica: String,
    /// Its cluster, locality and addresses.
    pub info: MemberInfo,
    /// It takes no new connections.
    pub draining: bool,
    /// Its beat grew within the lease (always true for this member's own).
    pub alive: bool,
    /// Time since its beat last grew.
    pub last_heard: Duration,
}

#[derive(Debug, Clone)]
struct Held {
    record: ReplicaRecord,
    grew: Instant,
    expired: bool,
}

/// Outcome of merging records: (merged, refused, whether what peers would route to
/// changed: a replica new, gone, moved or draining).
pub(super) type Merged = (usize, usize, bool);

/// This member's own record (when it is a named replica) and every other one it holds.
#[derive(Debug, Clone, Default)]
pub(super) struct Replicas {
    own: Option<ReplicaRecord>,
    /// When the own record last beat.
    beat_at: Option<Instant>,
    held: BTreeMap<ReplicaKey, Held>,
}

impl Replicas {
    /// This member is the replica `name` of `me`'s cluster (or the only gateway: `None`).
    pub fn new(name: Option<String>, me: &MemberInfo, generation: u64) -> Self {
        Self {
            own: name.map(|replica| ReplicaRecord {
                replica,
                info: me.clone(),
                generation,
                beat: 0,
                draining: false,
                seal: None,
                chain: None,
            }),
            beat_at: None,
            held: BTreeMap::new(),
        }
    }

    /// Signs the own record's current state.
    pub fn reseal(&mut self, sealing: &Sealing) {
        if let Some(r) = &mut self.own {
            let cert = sealing.chain().fingerprint;
            r.chain = Some(sealing.chain().clone());
            r.seal = match sealing.seal(&r.statement(cert)) {
                Ok(seal) => Some(seal),
                Err(e) => {
                    tracing::error!(error = %e, "cannot sign this replica's record");
                    None
                }
            };
        }
    }

    /// Marks the own record draining (or not); whether that changed it.
    pub fn set_draining(&mut self, draining: bool) -> bool {
        match &mut self.own {
            Some(r) if r.draining != draining => {
                r.draining = draining;
                r.beat += 1;
                true
            }
            _ => false,
        }
    }

    /// A round passed: the own record beats when due (returns whether it did, in `.1`);
    /// silent records expire (whether one did, in `.0`) and long-silent ones are forgotten.
    pub fn tick(&mut self, now: Instant, lease: Duration) -> (bool, bool) {
        let due = self
            .beat_at
            .is_none_or(|at| now.saturating_duration_since(at) >= lease / BEATS_PER_LEASE);
        let beat = due && self.own.is_some();
        if let Some(r) = self.own.as_mut().filter(|_| due) {
            r.beat += 1;
            self.beat_at = Some(now);
        }
        let mut changed = false;
        self.held.retain(|_, h| {
            let silent = now.saturating_duration_since(h.grew);
            if !h.expired && silent > lease {
                h.expired = true;
                changed = true;
            }
            silent <= lease * FORGET_AFTER_LEASES
        });
        (changed, beat)
    }

    /// Every record held (expired ones included, so peers do not send them again).
    pub fn digest(&self) -> BTreeMap<ReplicaKey, ReplicaDigest> {
        let held = self
            .held
            .iter()
            .map(|(k, h)| (k.clone(), h.record.digest()));
        let own = self.own.iter().map(|r| (r.key(), r.digest()));
        own.chain(held).collect()
    }

    /// The records a peer holding `theirs` lacks (expired ones are not passed on).
    pub fn delta(&self, theirs: &BTreeMap<ReplicaKey, ReplicaDigest>) -> Vec<ReplicaRecord> {
        let live = self.held.values().filter(|h| !h.expired).map(|h| &h.record);
        self.own
            .iter()
            .chain(live)
            .filter_map(|r| {
                let their = theirs.get(&r.key());
                their
                    .is_none_or(|d| r.newer_than(d))
                    .then(|| r.for_peer(their))
            })
            .collect()
    }

    /// Merges records from a peer. A sealed catalog (`sealing`) takes a record only when
    /// its replica signed it with a certificate of its cluster: the one sent along, or one
    /// already held for it (`known` gives the other certificates held per cluster: a
    /// replica often shares its cluster's).
    pub fn apply(
        &mut self,
        records: Vec<ReplicaRecord>,
        sealing: Option<&Sealing>,
        known: &dyn Fn(&str, u64) -> Option<Chain>,
        now: Instant,
    ) -> Merged {
        let (mut merged, mut refused, mut changed) = (0, 0, false);
        for mut r in records {
            let key = r.key();
            if self.own.as_ref().is_some_and(|o| o.key() == key) {
                // Only this replica writes its record. A newer incarnation of it that it
                // signed (a clock stepped back across a restart) is outranked.
                if let Some(sealing) = sealing
                    && verified(sealing, &r, None, known).is_some()
                    && let Some(own) = &mut self.own
                    && r.generation >= own.generation
                {
                    own.generation = r.generation.saturating_add(1);
                    own.beat = 0;
                    // Signed now, or peers would refuse it until the next beat.
                    self.reseal(sealing);
                }
                continue;
            }
            let held = self.held.get(&key);
            if held.is_some_and(|h| !r.newer_than(&h.record.digest())) {
                continue;
            }
            if held.is_none()
                && self.held.keys().filter(|(c, _)| *c == key.0).count() >= MAX_PER_CLUSTER
            {
                refused += 1;
                continue;
            }
            if let Some(sealing) = sealing {
                let held_chain = held.and_then(|h| h.record.chain.as_ref());
                match verified(sealing, &r, held_chain, known) {
                    Some(chain) => r.chain = Some(chain),
                    None => {
                        refused += 1;
                        continue;
                    }
                }
            }
            changed |= held.is_none_or(|h| {
                h.expired || h.record.info != r.info || h.record.draining != r.draining
            });
            merged += 1;
            self.held.insert(
                key,
                Held {
                    record: r,
                    grew: now,
                    expired: false,
                },
            );
        }
        (merged, refused, changed)
    }

    /// Every replica: this member's own first, then each held record.
    pub fn views(&self, now: Instant) -> Vec<ReplicaView> {
        let own = self.own.iter().map(|r| ReplicaView {
            replica: r.replica.clone(),
            info: r.info.clone(),
            draining: r.draining,
            alive: true,
            last_heard: Duration::ZERO,
        });
        let held = self.held.values().map(|h| ReplicaView {
            replica: h.record.replica.clone(),
            info: h.record.info.clone(),
            draining: h.record.draining,
            alive: !h.expired,
            last_heard: now.saturating_duration_since(h.grew),
        });
        own.chain(held).collect()
    }

    /// Forgets the certificates checked against other roots (they are checked again).
    pub fn forget_chains(&mut self) {
        for h in self.held.values_mut() {
            h.record.chain = None;
        }
    }
}

/// The certificate that verifies `r`'s signature, if a certificate of its cluster does:
/// the one it carries (checked against the federation's roots), or one held.
fn verified(
    sealing: &Sealing,
    r: &ReplicaRecord,
    held: Option<&Chain>,
    known: &dyn Fn(&str, u64) -> Option<Chain>,
) -> Option<Chain> {
    let seal = r.seal.as_ref()?;
    let chain = match &r.chain {
        Some(sent) if held.is_some_and(|h| h.certs == sent.certs) => held.cloned(),
        Some(sent) => sealing.check_chain(&r.info.cluster, &sent.certs).ok(),
        None => held
            .filter(|h| h.fingerprint == seal.cert)
            .cloned()
            .or_else(|| known(&r.info.cluster, seal.cert)),
    }?;
    sealing
        .verify(&chain, &r.statement(chain.fingerprint), seal)
        .then_some(chain)
}
