//! The seed disk: what the host hands a node when it boots, as a read-only virtio disk
//! after the root disk (`/dev/vdb` in the guest). It is a newc cpio archive whose first
//! entry is [`MARKER`] (holding the format version), followed by files named below.
//!
//! The host owns the cluster's identity: it creates the cluster CA and keeps its own
//! copy with the admin credentials it builds kubeconfigs from; the node gets the CA
//! here at its first boot and issues its components' certificates from it. Nothing
//! the node writes ever reaches the host's kubeconfig.

/// The first entry's name; its content is [`VERSION`].
pub const MARKER: &str = "kindling-seed";
/// The format version this kindling writes and reads.
pub const VERSION: &str = "1";
/// The subject common name of the cluster CA: the host makes the CA with it, and the
/// node issues certificates under it.
pub const CA_COMMON_NAME: &str = "kindling-ca";
/// The cluster CA's certificate (PEM).
pub const CA_CERT: &str = "pki/ca.crt";
/// The cluster CA's private key (PEM).
pub const CA_KEY: &str = "pki/ca.key";
/// The largest seed the agent reads (the guest reads only what the host wrote, but a
/// bound keeps a corrupted disk from costing memory).
pub const MAX_SIZE: u64 = 1 << 20;
/// The most entries the agent reads.
pub const MAX_ENTRIES: usize = 64;
