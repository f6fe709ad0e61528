//! Models, generic over the burn backend.

pub mod albert;
