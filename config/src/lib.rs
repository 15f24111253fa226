//! caremsg settings.
