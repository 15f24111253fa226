//! caremsg migrations.
