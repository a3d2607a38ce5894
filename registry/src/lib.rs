//! The OCI registry (arrives with the registry issue).
