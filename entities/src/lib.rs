//! caremsg entities.
