//! The federated catalog as a sans-IO state machine: every input (local exports, a peer's
//! digest or delta, the passage of time) is an explicit call with an explicit `now`, so
//! merge, expiry and failure detection are tested deterministically without sockets.
//!
//! Model (anti-entropy, scuttlebutt style):
//! - Each cluster is the only writer of its own *origin*: its services, each entry stamped
//!   with the origin's version counter at the time it changed; removals are tombstones.
//! - An origin has a *generation* (set at start-up; a restart picks a larger one) and a
//!   *heartbeat* that grows every gossip round.
//! - Members exchange digests (origin → generation, version, heartbeat) and answer with
//!   deltas: whole origins for newer generations, entries above the peer's version, or just
//!   the heartbeat. An origin's update is never cut short: the byte budget decides how
//!   many origins a delta carries.
//! - Receiving a larger heartbeat renews an origin's lease and feeds its phi detector. An
//!   origin whose heartbeat stops advancing is suspected (phi) and, after the lease, its
//!   services are withdrawn; until then they keep being served (static stability).
//! - Origins are signed ([`crate::seal`]): a sealed catalog signs its own origin at every
//!   change and heartbeat, and merges another only when the result is what that cluster
//!   signed. An origin's delta is therefore always whole (never a prefix of its entries).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::{MemberInfo, Service, ServiceKey};
use crate::phi::PhiDetector;
use crate::seal::{self, Chain, Seal, Sealing, Statement};

mod replicas;
use replicas::Replicas;
pub use replicas::{ReplicaDigest, ReplicaKey, ReplicaRecord, ReplicaView};

/// Tunables of the catalog.
#[derive(Debug, Clone)]
pub struct CatalogConfig {
    /// How long an origin's services outlive its last heartbeat.
    pub lease: Duration,
    /// Phi above which a member is considered down.
    pub phi_threshold: f64,
    /// Floor for the phi detector's mean heartbeat interval (about the gossip interval).
    pub min_heartbeat_interval: Duration,
    /// Byte budget of one delta message.
    pub max_delta_bytes: usize,
    /// Whether this member starts out speaking for its cluster (see [`Voice`]).
    pub voice: Voice,
    /// Largest gossip message: a delta with an origin over the budget stays under it.
    pub max_message_bytes: usize,
    /// Merge origins that arrive unsigned (from gateways of a version before signed
    /// origins), for the length of a rolling upgrade. An origin once held signed is never
    /// again taken unsigned.
    pub accept_unsigned: bool,
    /// This member's name as one of several gateways of its cluster: it announces itself
    /// in a replica record (`None`: the cluster's only gateway).
    pub replica: Option<String>,
}

impl Default for CatalogConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            // With heartbeats every ~100 ms, phi 5 is crossed after ~1.2 s of silence: the
            // 2 s detection target with room for a slow round or two.
            phi_threshold: 5.0,
            min_heartbeat_interval: Duration::from_millis(100),
            max_delta_bytes: 256 << 10,
            voice: Voice::Speak,
            max_message_bytes: 1 << 20,
            accept_unsigned: false,
            replica: None,
        }
    }
}

/// How far ahead of this member's own generation a claim about its cluster may be and still
/// be outranked: a day, in the microseconds generations count (see the gateway's
/// `start_generation`). Claims further ahead (a forged digest, say `u64::MAX`, which would
/// leave no generation to outrank it with) are ignored.
const MAX_GENERATION_LEAD: u64 = 86_400_000_000;

/// Whether `claimed` is a newer incarnation of this cluster worth outranking.
fn newer_incarnation(claimed: u64, mine: u64) -> bool {
    claimed > mine && claimed - mine <= MAX_GENERATION_LEAD
}

/// One entry of an origin: a live service or a tombstone, with the version it changed at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Origin version at which this entry last changed.
    pub version: u64,
    /// The service, or `None` for a tombstone.
    pub service: Option<Service>,
}

/// What a member knows of one origin, summarised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OriginDigest {
    /// Generation (start-up epoch) of the origin.
    pub generation: u64,
    /// Highest entry version known.
    pub version: u64,
    /// Highest heartbeat known.
    pub heartbeat: u64,
    /// Fingerprint of the origin's certificate held (0: none); a sender includes the
    /// certificate when it differs from its own.
    pub cert: u64,
}

/// A member's summary of everything it knows: origin cluster → digest (the map it
/// dereferences to), and each replica record it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Digest {
    /// Per origin cluster.
    pub origins: BTreeMap<String, OriginDigest>,
    /// Per replica record.
    pub replicas: BTreeMap<ReplicaKey, ReplicaDigest>,
}

impl Digest {
    /// Knows nothing.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<const N: usize> From<[(String, OriginDigest); N]> for Digest {
    fn from(origins: [(String, OriginDigest); N]) -> Self {
        Self {
            origins: BTreeMap::from(origins),
            replicas: BTreeMap::new(),
        }
    }
}

impl std::ops::Deref for Digest {
    type Target = BTreeMap<String, OriginDigest>;

    fn deref(&self) -> &Self::Target {
        &self.origins
    }
}

impl std::ops::DerefMut for Digest {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.origins
    }
}

/// Updates to one origin.
#[derive(Debug, Clone, PartialEq)]
pub struct OriginDelta {
    /// The origin's cluster id.
    pub cluster: String,
    /// Member details; sent with whole-origin updates (they change only with a generation).
    pub info: Option<MemberInfo>,
    /// Generation the entries belong to.
    pub generation: u64,
    /// The origin's heartbeat.
    pub heartbeat: u64,
    /// The receiver lacked this generation: these entries start a fresh origin state.
    pub full: bool,
    /// Changed entries, in ascending version order.
    pub entries: Vec<(ServiceKey, Entry)>,
    /// The origin's signature over the state these entries complete.
    pub seal: Option<Seal>,
    /// The origin's certificate chain, when the receiver may lack it.
    pub chain: Option<Chain>,
}

/// A gossip delta: updates to any number of origins.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Delta {
    /// Per-origin updates.
    pub origins: Vec<OriginDelta>,
    /// Replica records the receiver lacks.
    pub replicas: Vec<ReplicaRecord>,
}

impl Delta {
    /// Nothing to send (a quiet replica's delta may carry only its record: it is sent).
    pub fn is_empty(&self) -> bool {
        self.origins.is_empty() && self.replicas.is_empty()
    }
}

#[derive(Debug, Clone)]
struct Origin {
    info: MemberInfo,
    generation: u64,
    version: u64,
    heartbeat: u64,
    entries: BTreeMap<ServiceKey, Entry>,
    /// [`seal::content_hash`] of `info` and `entries`.
    content: [u8; 32],
    /// The origin's signature over its statement now (`None` in an unsealed catalog).
    seal: Option<Seal>,
    /// The certificate that verifies it.
    chain: Option<Chain>,
}

impl Origin {
    fn new(info: MemberInfo, generation: u64) -> Self {
        let entries = BTreeMap::new();
        Self {
            content: seal::content_hash(&info, &entries),
            info,
            generation,
            version: 0,
            heartbeat: 0,
            entries,
            seal: None,
            chain: None,
        }
    }

    fn digest(&self) -> OriginDigest {
        OriginDigest {
            generation: self.generation,
            version: self.version,
            heartbeat: self.heartbeat,
            cert: self.chain.as_ref().map_or(0, |c| c.fingerprint),
        }
    }

    fn rehash(&mut self) {
        self.content = seal::content_hash(&self.info, &self.entries);
    }

    /// The statement of this state, vouched for by the certificate `cert`.
    fn statement(&self, cert: u64) -> Statement<'_> {
        Statement {
            cluster: &self.info.cluster,
            generation: self.generation,
            version: self.version,
            heartbeat: self.heartbeat,
            content: &self.content,
            cert,
        }
    }

    fn merge(&mut self, entries: Vec<(ServiceKey, Entry)>) {
        for (key, entry) in entries {
            self.version = self.version.max(entry.version);
            match self.entries.get(&key) {
                // Only a newer version replaces: a stale add never revives a tombstone.
                Some(have) if have.version >= entry.version => {}
                _ => {
                    self.entries.insert(key, entry);
                }
            }
        }
    }

    /// The update a peer with digest `theirs` is missing, if it fits in `budget` bytes
    /// (taken from it). Never a part of one: it would not be what the origin signed.
    fn delta_for(&self, theirs: Option<&OriginDigest>, budget: &mut usize) -> Option<OriginDelta> {
        let (full, since) = match theirs {
            None => (true, 0),
            Some(d) if d.generation < self.generation => (true, 0),
            Some(d) if d.generation > self.generation => return None,
            Some(d) if d.version < self.version => (false, d.version),
            Some(d) if d.heartbeat < self.heartbeat => (false, self.version),
            Some(_) => return None,
        };
        let mut changed: Vec<_> = self
            .entries
            .iter()
            .filter(|(_, e)| e.version > since)
            .collect();
        changed.sort_by_key(|(_, e)| e.version);
        let chain = self
            .chain
            .as_ref()
            .filter(|c| full || theirs.is_none_or(|d| d.cert != c.fingerprint));
        let size = 32
            + self.info.cluster.len()
            + self.seal.as_ref().map_or(0, |s| 16 + s.signature.len())
            + chain.map_or(0, Chain::size)
            + changed
                .iter()
                .map(|(key, entry)| {
                    16 + key.namespace.len()
                        + key.name.len()
                        + entry.service.as_ref().map_or(0, Service::estimated_size)
                })
                .sum::<usize>();
        if size > *budget {
            return None;
        }
        *budget -= size;
        Some(OriginDelta {
            cluster: self.info.cluster.clone(),
            info: full.then(|| self.info.clone()),
            generation: self.generation,
            heartbeat: self.heartbeat,
            full,
            entries: changed
                .into_iter()
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect(),
            seal: self.seal.clone(),
            chain: chain.cloned(),
        })
    }
}

#[derive(Debug, Clone)]
struct Remote {
    origin: Origin,
    detector: PhiDetector,
    /// When the heartbeat last advanced (or the origin was first learned).
    last_heard: Instant,
    /// The lease ran out: services withdrawn until the heartbeat advances again.
    expired: bool,
}

/// How a member looks from here.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberView {
    /// Who.
    pub info: MemberInfo,
    /// Not suspected and within its lease (always true for this member).
    pub alive: bool,
    /// Whether its lease ran out (its services are withdrawn).
    pub expired: bool,
    /// Current suspicion level.
    pub phi: f64,
    /// Time since its heartbeat last advanced.
    pub last_heard: Duration,
    /// Generation, version and heartbeat known.
    pub digest: OriginDigest,
    /// Live services it exports.
    pub services: usize,
}

/// A service of some origin, as served from this member's view.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogEntry {
    /// The origin cluster's member details.
    pub origin: MemberInfo,
    /// The service.
    pub key: ServiceKey,
    /// Its definition.
    pub service: Service,
    /// Entry version at the origin.
    pub version: u64,
    /// Time since the origin's heartbeat last advanced (how old the lease is).
    pub lease_age: Duration,
    /// Whether the origin is currently considered alive.
    pub origin_alive: bool,
}

/// Counters of what `apply` did, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Entries that changed the catalog.
    pub entries_applied: usize,
    /// Replica records merged (newer beats included).
    pub replicas_applied: usize,
    /// Origin updates ignored (about ourselves, or an older generation).
    pub ignored: usize,
    /// Origin updates refused: not what that origin signed, or no valid certificate of it.
    pub rejected: usize,
    /// Whether the visible catalog (or a replica peers route to) may have changed.
    pub changed: bool,
}

/// One member's catalog: its own origin plus what it learned of every other.
#[derive(Debug, Clone)]
pub struct Catalog {
    config: CatalogConfig,
    local: Origin,
    remotes: BTreeMap<String, Remote>,
    /// Whether this replica speaks for its cluster (see [`Voice`]).
    voice: Voice,
    /// Quiet now: neither sends its own origin nor outranks its cluster's.
    quiet: bool,
    /// The newest sibling incarnation heard (a replica of this cluster with another
    /// generation), and when its heartbeat last grew.
    sibling: Option<(OriginDigest, Instant)>,
    /// The certificate that verified the sibling's statements (sealed catalogs).
    sibling_chain: Option<Chain>,
    /// Since when the voice is `Auto` (it listens a while before it speaks).
    auto_since: Option<Instant>,
    /// This member's key and the federation's trust: signs the own origin, checks others'.
    /// `None` only in the state machine's own tests (nothing is signed or checked).
    sealing: Option<Arc<Sealing>>,
    /// This member's replica record and those of every other replica.
    replicas: Replicas,
}

/// Whether a replica speaks for its cluster in gossip. Several replicas of one cluster
/// must not all publish its origin: each would outrank the others' generation every
/// round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Voice {
    /// Speaks (the only replica, or the holder of the cluster's writer Lease): publishes
    /// the cluster's origin and outranks any other incarnation it hears of.
    #[default]
    Speak,
    /// Another replica speaks (it holds the Lease): relays, never publishes its own.
    Quiet,
    /// Nobody knows who speaks (the Lease cannot be read): listens for a sixth of the
    /// lease first, then stays quiet while a newer sibling incarnation is heard alive and
    /// speaks otherwise. Exactly one replica, the newest, ends up speaking.
    Auto,
}

impl Catalog {
    /// A catalog for the member `me`, whose current start-up epoch is `generation` (use a
    /// value that grows across restarts, e.g. the start time in milliseconds).
    pub fn new(me: MemberInfo, generation: u64, config: CatalogConfig) -> Self {
        Self {
            replicas: Replicas::new(config.replica.clone(), &me, generation),
            local: Origin::new(me, generation),
            remotes: BTreeMap::new(),
            voice: config.voice,
            quiet: config.voice != Voice::Speak,
            sibling: None,
            sibling_chain: None,
            auto_since: None,
            sealing: None,
            config,
        }
    }

    /// A catalog that signs its origin with `sealing` and merges only signed origins of
    /// the federation (what a running member uses).
    pub fn sealed(
        me: MemberInfo,
        generation: u64,
        config: CatalogConfig,
        sealing: Arc<Sealing>,
    ) -> Self {
        let mut c = Self::new(me, generation, config);
        c.set_sealing(sealing);
        c
    }

    /// Signs with (and checks against) `sealing` from now on: a rotated certificate.
    pub fn set_sealing(&mut self, sealing: Arc<Sealing>) {
        if self
            .sealing
            .as_ref()
            .is_some_and(|old| !old.same_roots(&sealing))
        {
            // Other roots (one retired, say): every origin's certificate is checked again,
            // as it comes (the digest shows none held, so peers send it).
            for r in self.remotes.values_mut() {
                r.origin.chain = None;
            }
            self.sibling_chain = None;
            self.replicas.forget_chains();
        }
        self.local.chain = Some(sealing.chain().clone());
        self.replicas.reseal(&sealing);
        self.sealing = Some(sealing);
        self.reseal();
    }

    /// Signs the own origin's current state.
    fn reseal(&mut self) {
        let Some(s) = &self.sealing else {
            return;
        };
        let cert = s.chain().fingerprint;
        match s.seal(&self.local.statement(cert)) {
            Ok(seal) => self.local.seal = Some(seal),
            Err(e) => {
                // Peers will refuse the origin until a signature succeeds.
                tracing::error!(error = %e, "cannot sign this cluster's catalog origin");
                self.local.seal = None;
            }
        }
    }

    /// Sets whether this replica speaks for its cluster; takes effect at once for
    /// `Speak` and `Quiet`, at the next tick for `Auto`.
    pub fn set_voice(&mut self, voice: Voice, now: Instant) {
        if voice != self.voice {
            self.auto_since = None;
        }
        self.voice = voice;
        self.update_quiet(now);
    }

    /// Whether this replica publishes its cluster's origin now.
    pub fn speaks(&self) -> bool {
        !self.quiet
    }

    /// A sibling is alive while its heartbeat keeps growing (relays of an old one do not
    /// count); a sixth of the lease is several gossip rounds.
    fn newer_sibling_alive(&self, now: Instant) -> bool {
        self.sibling.is_some_and(|(d, at)| {
            d.generation > self.local.generation
                && now.saturating_duration_since(at) < self.config.lease / 6
        })
    }

    fn update_quiet(&mut self, now: Instant) {
        if self.voice == Voice::Auto && self.auto_since.is_none() {
            self.auto_since = Some(now);
        }
        let listening = self
            .auto_since
            .is_some_and(|at| now.saturating_duration_since(at) < self.config.lease / 6);
        self.quiet = match self.voice {
            Voice::Speak => false,
            Voice::Quiet => true,
            Voice::Auto => listening || self.newer_sibling_alive(now),
        };
    }

    /// Whether this member must outrank a newer incarnation of its cluster it learns of:
    /// it speaks, and no newer sibling is alive (when the Lease names it, always).
    fn outranks(&self, now: Instant) -> bool {
        match self.voice {
            Voice::Speak => true,
            Voice::Quiet => false,
            Voice::Auto => !self.quiet && !self.newer_sibling_alive(now),
        }
    }

    /// Learns from a peer's digest which generation of this cluster the federation holds
    /// (even an expired one, which is no longer relayed): a speaking member outranks it,
    /// or peers would keep ignoring its origin.
    /// A sealed catalog does not: a digest is not signed, and its own cluster's newer
    /// incarnation reaches it as a signed statement instead ([`Catalog::delta_to`] sends
    /// it even when it expired), which [`Catalog::apply`] checks.
    pub fn note_digest(&mut self, theirs: &Digest, now: Instant) {
        if self.sealing.is_some() {
            return;
        }
        if let Some(d) = theirs.get(&self.local.info.cluster)
            && newer_incarnation(d.generation, self.local.generation)
            && self.outranks(now)
        {
            self.local.generation = d.generation.saturating_add(1);
            self.reseal();
        }
    }

    /// The certificate of `od`, a statement about this member's own cluster by another
    /// incarnation (a sibling replica, or a previous one of this), if a key of this cluster
    /// signed it: checked on the content hash sent to replicas ([`Catalog::delta_to`]).
    fn verify_sibling(&self, sealing: &Sealing, od: &OriginDelta, version: u64) -> Option<Chain> {
        let seal = od.seal.clone()?;
        let content = seal.content?;
        let known = [self.sibling_chain.as_ref(), self.local.chain.as_ref()];
        let held = known
            .into_iter()
            .flatten()
            .find(|c| c.fingerprint == seal.cert);
        let claim = Claim {
            cluster: &self.local.info.cluster,
            generation: od.generation,
            version,
            heartbeat: od.heartbeat,
            content: &content,
        };
        verify(sealing, &claim, held, Some(seal), od.chain.clone())
            .ok()
            .map(|(_, chain)| chain)
    }

    /// This member.
    pub fn me(&self) -> &MemberInfo {
        &self.local.info
    }

    /// Replaces this member's exports; returns whether anything changed.
    pub fn set_local(&mut self, mut services: BTreeMap<ServiceKey, Service>) -> bool {
        // What receivers keep is what is signed: a selection over the wire's limits is
        // dropped here as they would drop it.
        for s in services.values_mut() {
            if !crate::wire::selection_fits(&s.selection) {
                s.selection = Default::default();
            }
        }
        let mut changed = false;
        for (key, service) in &services {
            let same = matches!(self.local.entries.get(key), Some(Entry { service: Some(s), .. }) if s == service);
            if !same {
                self.local.version += 1;
                self.local.entries.insert(
                    key.clone(),
                    Entry {
                        version: self.local.version,
                        service: Some(service.clone()),
                    },
                );
                changed = true;
            }
        }
        let removed: Vec<ServiceKey> = self
            .local
            .entries
            .iter()
            .filter(|(k, e)| e.service.is_some() && !services.contains_key(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for key in removed {
            self.local.version += 1;
            self.local.entries.insert(
                key,
                Entry {
                    version: self.local.version,
                    service: None,
                },
            );
            changed = true;
        }
        if changed {
            self.local.rehash();
            self.reseal();
        }
        changed
    }

    /// One gossip round passed: beat our heart and expire silent origins. Returns whether
    /// the visible catalog changed (an origin's lease ran out).
    pub fn tick(&mut self, now: Instant) -> bool {
        self.local.heartbeat += 1;
        self.update_quiet(now);
        if !self.quiet {
            self.reseal();
        }
        let (mut changed, beat) = self.replicas.tick(now, self.config.lease);
        if beat && let Some(s) = &self.sealing {
            self.replicas.reseal(s);
        }
        for r in self.remotes.values_mut() {
            if !r.expired && now.saturating_duration_since(r.last_heard) > self.config.lease {
                r.expired = true;
                changed = true;
            }
        }
        changed
    }

    /// What this member knows, summarised.
    pub fn digest(&self) -> Digest {
        let mut d = Digest::new();
        d.origins = self
            .remotes
            .iter()
            .map(|(c, r)| (c.clone(), r.origin.digest()))
            .collect();
        // A quiet replica claims what it has heard of the speaker, so peers send it only
        // what is new (it keeps none of it: only the speaker writes the cluster's origin).
        let own = if self.quiet {
            self.sibling.map(|(d, _)| d)
        } else {
            Some(self.local.digest())
        };
        if let Some(own) = own {
            d.insert(self.local.info.cluster.clone(), own);
        }
        d.replicas = self.replicas.digest();
        d
    }

    /// What a peer with digest `theirs` is missing, within the byte budget. Origins whose
    /// lease ran out here are not passed on, so a dead member is not revived by gossip.
    pub fn delta_for(&self, theirs: &Digest) -> Delta {
        self.delta_to(theirs, None)
    }

    /// [`Catalog::delta_for`] a member of cluster `to`: its own cluster's origin carries
    /// the content hash (a replica holds none of its entries, yet checks its signature).
    pub fn delta_to(&self, theirs: &Digest, to: Option<&str>) -> Delta {
        let mut d = self.delta_all(theirs);
        // A member is sent its own cluster's origin even when it expired here: it may be a
        // newer incarnation of it that the member must outrank (only a signed statement
        // makes it).
        if let Some(to) = to
            && !d.origins.iter().any(|o| o.cluster == to)
            && let Some(r) = self.remotes.get(to).filter(|r| r.expired)
        {
            let mut budget = usize::MAX;
            if let Some(od) = r.origin.delta_for(theirs.get(to), &mut budget) {
                d.origins.push(od);
            }
        }
        if let Some(to) = to {
            let mut held =
                std::iter::once(&self.local).chain(self.remotes.values().map(|r| &r.origin));
            if let Some(origin) = held.rfind(|o| o.info.cluster == to)
                && let Some(od) = d.origins.iter_mut().find(|o| o.cluster == to)
                && let Some(seal) = &mut od.seal
            {
                seal.content = Some(origin.content);
            }
        }
        d
    }

    fn delta_all(&self, theirs: &Digest) -> Delta {
        let mut budget = self.config.max_delta_bytes;
        let mut origins = Vec::new();
        let live_remotes = self
            .remotes
            .values()
            .filter(|r| !r.expired)
            .map(|r| &r.origin);
        let own = std::iter::once(&self.local).filter(|_| !self.quiet);
        // One origin that does not fit the budget may go over it, as long as the message
        // stays within its limit (less room for framing): or an origin bigger than the
        // budget would never replicate.
        let room = self.config.max_message_bytes.saturating_sub(8 << 10);
        let mut oversize = true;
        for origin in own.chain(live_remotes) {
            let theirs = theirs.get(&origin.info.cluster);
            let mut left = budget;
            if let Some(d) = origin.delta_for(theirs, &mut left) {
                budget = left;
                origins.push(d);
                continue;
            }
            if oversize {
                let spent = self.config.max_delta_bytes - budget;
                let mut left = room.saturating_sub(spent);
                if let Some(d) = origin.delta_for(theirs, &mut left) {
                    oversize = false;
                    budget = 0;
                    origins.push(d);
                }
            }
        }
        Delta {
            origins,
            replicas: self.replicas.delta(&theirs.replicas),
        }
    }

    /// Merges a delta received from a peer.
    pub fn apply(&mut self, delta: Delta, now: Instant) -> ApplyStats {
        let mut stats = ApplyStats::default();
        let Delta { origins, replicas } = delta;
        for od in origins {
            if od.cluster == self.local.info.cluster {
                // Only this member writes its own origin. If the federation holds a newer
                // generation of it (a clock stepped back across a restart, or a forged one),
                // outrank it so this incarnation is not ignored everywhere.
                // (Equal is the normal relay of our own state.)
                if od.generation != self.local.generation {
                    let mut version = od.entries.iter().map(|(_, e)| e.version).max().unwrap_or(0);
                    if let Some((d, _)) = &self.sibling
                        && d.generation == od.generation
                    {
                        version = version.max(d.version);
                    }
                    // A sealed catalog believes only what a key of its cluster signed.
                    let mut cert = 0;
                    if let Some(sealing) = &self.sealing {
                        match self.verify_sibling(sealing, &od, version) {
                            Some(chain) => {
                                cert = chain.fingerprint;
                                self.sibling_chain = Some(chain);
                            }
                            None => {
                                stats.ignored += 1;
                                continue;
                            }
                        }
                    }
                    let heard = OriginDigest {
                        generation: od.generation,
                        version,
                        heartbeat: od.heartbeat,
                        // (So that peers do not send the certificate every round.)
                        cert,
                    };
                    match &mut self.sibling {
                        Some((d, at)) if d.generation == od.generation => {
                            d.version = d.version.max(version);
                            if od.heartbeat > d.heartbeat {
                                d.heartbeat = od.heartbeat;
                                *at = now;
                            }
                        }
                        Some((d, _)) if d.generation > od.generation => {}
                        _ => self.sibling = Some((heard, now)),
                    }
                }
                // A verified statement (sealed) is outranked however far ahead; an unsigned
                // claim only within a day.
                let newer = if self.sealing.is_some() {
                    od.generation > self.local.generation
                } else {
                    newer_incarnation(od.generation, self.local.generation)
                };
                if newer && self.outranks(now) {
                    self.local.generation = od.generation.saturating_add(1);
                    self.reseal();
                    stats.changed = true;
                }
                stats.ignored += 1;
                continue;
            }
            let min_mean = self.config.min_heartbeat_interval;
            let (same, replace) = match self.remotes.get(&od.cluster) {
                Some(r) if od.generation < r.origin.generation => (false, false),
                Some(r) if od.generation == r.origin.generation => (true, false),
                Some(_) if !od.full => (false, false),
                _ => (false, true),
            };
            if !same && !replace {
                stats.ignored += 1;
                continue;
            }
            let existing = self.remotes.get(&od.cluster).map(|r| &r.origin);
            // Checked unless it is an unsigned origin taken during an upgrade: never one
            // held signed before.
            let check = self.sealing.is_some()
                && !(self.config.accept_unsigned
                    && od.seal.is_none()
                    && existing.is_none_or(|o| o.seal.is_none()));
            if check && od.seal.is_none() {
                tracing::debug!(origin = %od.cluster, "unsigned origin update refused");
                stats.rejected += 1;
                continue;
            }
            if same && check && existing.is_some_and(|o| od.heartbeat <= o.heartbeat) {
                // A signed state is only proven newer by its heartbeat: the same or an
                // older one (a slow relay, or a replay) carries nothing new.
                stats.ignored += 1;
                continue;
            }
            if same && od.entries.is_empty() && od.info.is_none() {
                // Only a heartbeat (the usual case, every round): checked against the state
                // held, updated in place.
                let r = self.remotes.get_mut(&od.cluster).expect("checked above");
                if let Some(sealing) = self.sealing.as_ref().filter(|_| check) {
                    // (A checked update got here only with a newer heartbeat.)
                    let claim = Claim {
                        heartbeat: od.heartbeat,
                        ..Claim::of(&r.origin)
                    };
                    let verified =
                        verify(sealing, &claim, r.origin.chain.as_ref(), od.seal, od.chain);
                    let Some((seal, chain)) = counted(&mut stats, &od.cluster, verified) else {
                        continue;
                    };
                    r.origin.seal = Some(seal);
                    r.origin.chain = Some(chain);
                }
                if od.heartbeat > r.origin.heartbeat {
                    r.origin.heartbeat = od.heartbeat;
                    r.detector.heartbeat(now);
                    r.last_heard = now;
                    if r.expired {
                        r.expired = false;
                        stats.changed = true;
                    }
                }
                continue;
            }
            // What the origin would be after this update.
            let mut next = match (existing, replace) {
                (Some(o), false) => o.clone(),
                _ => {
                    // Unknown origin, or a newer generation (always sent whole): its entries
                    // replace whatever we had (a restarted origin drops what it no longer
                    // exports).
                    let Some(info) = od.info.clone().or_else(|| existing.map(|o| o.info.clone()))
                    else {
                        stats.ignored += 1;
                        continue;
                    };
                    Origin::new(info, od.generation)
                }
            };
            let n = if replace {
                od.entries.len()
            } else {
                count_newer(&next, &od.entries)
            };
            let before = next.entries.len();
            let had_entries = !od.entries.is_empty();
            next.merge(od.entries);
            if od.heartbeat > next.heartbeat {
                next.heartbeat = od.heartbeat;
            }
            if had_entries || replace {
                next.rehash();
            }
            if let Some(sealing) = self.sealing.as_ref().filter(|_| check) {
                let held = existing.and_then(|o| o.chain.as_ref());
                let verified = verify(sealing, &Claim::of(&next), held, od.seal, od.chain);
                let Some((seal, chain)) = counted(&mut stats, &od.cluster, verified) else {
                    continue;
                };
                next.seal = Some(seal);
                next.chain = Some(chain);
            }
            if replace {
                stats.entries_applied += n;
                self.remotes.insert(
                    od.cluster,
                    Remote {
                        origin: next,
                        detector: PhiDetector::new(now, min_mean),
                        last_heard: now,
                        expired: false,
                    },
                );
                stats.changed = true;
                continue;
            }
            let r = self.remotes.get_mut(&od.cluster).expect("checked above");
            if next.heartbeat > r.origin.heartbeat {
                r.detector.heartbeat(now);
                r.last_heard = now;
                if r.expired {
                    r.expired = false;
                    stats.changed = true;
                }
            }
            r.origin = next;
            stats.entries_applied += n;
            stats.changed |= n > 0 || before != r.origin.entries.len();
        }
        if !replicas.is_empty() {
            // A replica often shares its cluster's certificate: any held for the cluster
            // verifies its record.
            let known = |cluster: &str, fingerprint: u64| {
                let origins =
                    std::iter::once(&self.local).chain(self.remotes.values().map(|r| &r.origin));
                origins
                    .filter(|o| o.info.cluster == cluster)
                    .filter_map(|o| o.chain.as_ref())
                    .chain(
                        self.sibling_chain
                            .as_ref()
                            .filter(|_| cluster == self.local.info.cluster),
                    )
                    .find(|c| c.fingerprint == fingerprint)
                    .cloned()
            };
            let (merged, refused, changed) =
                self.replicas
                    .apply(replicas, self.sealing.as_deref(), &known, now);
            stats.replicas_applied += merged;
            stats.rejected += refused;
            stats.changed |= changed;
        }
        stats
    }

    /// Marks this replica draining (or not) in its record; whether that changed it.
    pub fn set_draining(&mut self, draining: bool) -> bool {
        let changed = self.replicas.set_draining(draining);
        if changed && let Some(s) = &self.sealing {
            self.replicas.reseal(s);
        }
        changed
    }

    /// Every gateway replica known: this member's own record first (when it is a named
    /// replica), then every other held, expired ones included (`alive` false).
    pub fn replicas(&self, now: Instant) -> Vec<ReplicaView> {
        self.replicas.views(now)
    }

    /// Every member, this one first.
    pub fn members(&self, now: Instant) -> Vec<MemberView> {
        let live = |o: &Origin| o.entries.values().filter(|e| e.service.is_some()).count();
        let mut out = vec![MemberView {
            info: self.local.info.clone(),
            alive: true,
            expired: false,
            phi: 0.0,
            last_heard: Duration::ZERO,
            digest: self.local.digest(),
            services: live(&self.local),
        }];
        for r in self.remotes.values() {
            let phi = r.detector.phi(now);
            out.push(MemberView {
                info: r.origin.info.clone(),
                alive: !r.expired && phi < self.config.phi_threshold,
                expired: r.expired,
                phi,
                last_heard: now.saturating_duration_since(r.last_heard),
                digest: r.origin.digest(),
                services: live(&r.origin),
            });
        }
        out
    }

    /// Every live service of every origin whose lease holds (this member's own included).
    pub fn services(&self, now: Instant) -> Vec<CatalogEntry> {
        let mut out = Vec::new();
        let local = std::iter::once((&self.local, Duration::ZERO, true));
        let remotes = self.remotes.values().filter(|r| !r.expired).map(|r| {
            let alive = r.detector.phi(now) < self.config.phi_threshold;
            (
                &r.origin,
                now.saturating_duration_since(r.last_heard),
                alive,
            )
        });
        for (origin, lease_age, origin_alive) in local.chain(remotes) {
            for (key, entry) in &origin.entries {
                if let Some(service) = &entry.service {
                    out.push(CatalogEntry {
                        origin: origin.info.clone(),
                        key: key.clone(),
                        service: service.clone(),
                        version: entry.version,
                        lease_age,
                        origin_alive,
                    });
                }
            }
        }
        out
    }
}

/// What a state says about its origin: what the origin must have signed.
struct Claim<'a> {
    cluster: &'a str,
    generation: u64,
    version: u64,
    heartbeat: u64,
    content: &'a [u8; 32],
}

impl<'a> Claim<'a> {
    fn of(o: &'a Origin) -> Claim<'a> {
        Claim {
            cluster: &o.info.cluster,
            generation: o.generation,
            version: o.version,
            heartbeat: o.heartbeat,
            content: &o.content,
        }
    }
}

/// Why an update could not be taken as its origin's.
enum Unverified {
    /// No certificate of the origin is held and none came with it (held ones are dropped
    /// when the roots change): nothing is wrong with it, it cannot be checked yet.
    NoCertificate,
    /// Not what the origin signed, or no valid certificate of it.
    Refused(String),
}

/// The outcome of [`verify`] for `origin`, counted: the seal and certificate to keep, or
/// `None` (refused, or ignored until a certificate comes along: held ones were dropped when
/// the roots changed, and the next update carries it, as our digest shows none).
fn counted(
    stats: &mut ApplyStats,
    origin: &str,
    verified: Result<(Seal, Chain), Unverified>,
) -> Option<(Seal, Chain)> {
    match verified {
        Ok(ok) => Some(ok),
        Err(Unverified::NoCertificate) => {
            stats.ignored += 1;
            None
        }
        Err(Unverified::Refused(why)) => {
            tracing::debug!(%origin, %why, "origin update refused");
            stats.rejected += 1;
            None
        }
    }
}

/// Checks that `claim` is what its origin signed: `seal` by the certificate sent along
/// (`chain`, checked against the federation) or the one held.
fn verify(
    sealing: &Sealing,
    claim: &Claim<'_>,
    held: Option<&Chain>,
    seal: Option<Seal>,
    chain: Option<Chain>,
) -> Result<(Seal, Chain), Unverified> {
    let seal = seal.ok_or_else(|| Unverified::Refused("unsigned".into()))?;
    let chain = match (chain, held) {
        // The same certificate as held: the held one, already checked (a fingerprint is
        // never trusted alone).
        (Some(c), Some(h)) if h.certs == c.certs => h.clone(),
        (Some(c), _) => sealing
            .check_chain(claim.cluster, &c.certs)
            .map_err(Unverified::Refused)?,
        (None, Some(h)) => h.clone(),
        (None, None) => return Err(Unverified::NoCertificate),
    };
    let statement = Statement {
        cluster: claim.cluster,
        generation: claim.generation,
        version: claim.version,
        heartbeat: claim.heartbeat,
        content: claim.content,
        cert: chain.fingerprint,
    };
    if !sealing.verify(&chain, &statement, &seal) {
        return Err(Unverified::Refused("not what the origin signed".to_owned()));
    }
    Ok((seal, chain))
}

fn count_newer(origin: &Origin, entries: &[(ServiceKey, Entry)]) -> usize {
    entries
        .iter()
        .filter(|(k, e)| {
            origin
                .entries
                .get(k)
                .is_none_or(|have| have.version < e.version)
        })
        .count()
}

#[cfg(test)]
mod tests;
