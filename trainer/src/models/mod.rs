//! Models, generic over the burn backend.

pub mod albert;
pub mod resnet;
pub mod swav;
