//! The actor system: actix actors on their own thread, and the registry that starts
//! a [`ConversationActor`](conversation::ConversationActor) per patient on demand and
//! forgets it when it passivates.
//!
//! The registry holds at most `conversations.max_live` actors that are not leaving: to
//! start one more, it first asks the least recently used ones to passivate (a sixteenth
//! of the bound at a time, so that the search for them is paid once per many starts).
//! An actor asked to leave finishes the messages already in its mailbox, then stops;
//! until it has, the registry keeps pointing at it, so a patient never has two actors
//! at once, and a message for it in the meantime takes it back (it stays).
//!
//! **Architecture Invariant:** no actor keeps state that is not also in the database.
//! An actor is a serialiser and a cache: stopping it (passivation, a crash, a
//! restart) loses nothing; the next one rebuilds from the database.
//!
//! **Architecture Invariant:** actors do their database work on the main tokio
//! runtime ([`on_main`]), never on the actor thread, so every pooled connection
//! belongs to one runtime and outlives the actor system at shutdown.

pub mod conversation;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use actix::{Actor, Addr, ArbiterHandle, Handler, MailboxError, Message, System};

use self::conversation::ConversationActor;
use crate::state::AppState;

/// The actix system, running on a thread of its own.
pub struct ActorSystem {
    // Stops the system's event loop.
    system: System,
    // Where actors are started.
    arbiter: ArbiterHandle,
    // The thread running the system; joined at shutdown.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ActorSystem {
    /// Starts the actor thread.
    pub fn start() -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("caremsg-actors".into())
            .spawn(move || {
                let runner = System::new();
                runner.block_on(async {
                    let _ = tx.send((System::current(), actix::Arbiter::current()));
                });
                if let Err(err) = runner.run() {
                    tracing::error!(error = %err, "The actor system ended with an error.");
                }
            })?;
        let (system, arbiter) = rx
            .recv()
            .map_err(|_| std::io::Error::other("the actor thread did not start"))?;
        Ok(Self {
            system,
            arbiter,
            thread: Some(thread),
        })
    }

    /// Stops every actor and the thread.
    pub fn stop(&mut self) {
        self.system.stop();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("The actor thread panicked while stopping.");
        }
    }
}

impl Drop for ActorSystem {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}

/// Why a message could not be handled by its actor.
#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    /// The actor system is stopping.
    #[error("the actor system is stopped")]
    Stopped,
}

/// A live conversation actor and the generation that identifies it.
struct Live {
    generation: u64,
    addr: Addr<ConversationActor>,
    // When the registry last handed out its address.
    used: Instant,
    // Asked to passivate to make room, and not taken back since.
    leaving: bool,
}

/// The live actors by patient id.
#[derive(Default)]
pub(crate) struct LiveMap {
    actors: HashMap<String, Live>,
    // How many of `actors` are leaving.
    leaving: usize,
}

impl LiveMap {
    /// Removes the entry of `patient_id`.
    fn remove(&mut self, patient_id: &str) {
        if let Some(gone) = self.actors.remove(patient_id)
            && gone.leaving
        {
            self.leaving -= 1;
        }
    }

    /// Actors that are not leaving.
    fn staying(&self) -> usize {
        self.actors.len() - self.leaving
    }

    /// Asks the least recently used actors to passivate until one more would keep the
    /// staying ones within `max` (and a sixteenth of `max` below it, so the next starts
    /// find room without a search); how many were asked.
    fn make_room(&mut self, max: usize) -> usize {
        let staying = self.staying();
        if staying < max {
            return 0;
        }
        let count = (staying + 1 - max + max / 16).min(staying);
        let mut oldest: Vec<(Instant, &String)> = self
            .actors
            .iter()
            .filter(|(_, live)| !live.leaving)
            .map(|(id, live)| (live.used, id))
            .collect();
        if count < oldest.len() {
            oldest.select_nth_unstable_by_key(count, |(used, _)| *used);
        }
        let leaving: Vec<String> = oldest[..count]
            .iter()
            .map(|(_, id)| (*id).clone())
            .collect();
        for id in &leaving {
            if let Some(live) = self.actors.get_mut(id) {
                live.leaving = true;
                live.addr.do_send(conversation::Passivate);
            }
        }
        self.leaving += leaving.len();
        leaving.len()
    }
}

/// Starts, finds and forgets conversation actors.
pub struct Conversations {
    // Where actors run.
    system: Mutex<ActorSystem>,
    // The live actors by patient id. Shared with the actors, which remove themselves.
    live: Arc<Mutex<LiveMap>>,
    // Tells a passivating actor whether the registry still points at it.
    generation: AtomicU64,
    // The daemon's state, for new actors (weak: the state owns this registry).
    state: Weak<AppState>,
}

impl Conversations {
    /// A registry starting its actors on `system`.
    pub fn new(system: ActorSystem, state: Weak<AppState>) -> Self {
        Self {
            system: Mutex::new(system),
            live: Arc::default(),
            generation: AtomicU64::new(1),
            state,
        }
    }

    /// How many conversation actors are live.
    pub fn live(&self) -> usize {
        self.live.lock().map(|l| l.actors.len()).unwrap_or(0)
    }

    /// How many live actors are not leaving (asked to passivate to make room): at
    /// most `conversations.max_live`.
    pub fn staying(&self) -> usize {
        self.live.lock().map(|l| l.staying()).unwrap_or(0)
    }

    /// Whether the actor of `patient_id` is live now (it may passivate the next
    /// moment: a hint, never a promise).
    pub fn is_live(&self, patient_id: &str) -> bool {
        self.live
            .lock()
            .map(|l| l.actors.contains_key(patient_id))
            .unwrap_or(false)
    }

    /// Sends `message` to the actor of `patient_id`, starting it if needed. An actor
    /// that passivated between lookup and send is replaced and the message sent again.
    pub async fn send<M>(&self, patient_id: &str, message: M) -> Result<M::Result, ActorError>
    where
        M: Message + Send + Clone + 'static,
        M::Result: Send,
        ConversationActor: Handler<M>,
    {
        for _ in 0..4 {
            let addr = self.addr(patient_id)?;
            match addr.send(message.clone()).await {
                Ok(result) => return Ok(result),
                Err(MailboxError::Closed) => {
                    self.forget_closed(patient_id);
                    continue;
                }
                Err(MailboxError::Timeout) => continue,
            }
        }
        Err(ActorError::Stopped)
    }

    fn addr(&self, patient_id: &str) -> Result<Addr<ConversationActor>, ActorError> {
        let mut live = self.live.lock().map_err(|_| ActorError::Stopped)?;
        let live = &mut *live;
        if let Some(entry) = live.actors.get_mut(patient_id)
            && entry.addr.connected()
        {
            entry.used = Instant::now();
            if entry.leaving {
                // Taken back: its `Passivate` finds it staying and is ignored.
                entry.leaving = false;
                live.leaving -= 1;
            }
            return Ok(entry.addr.clone());
        }
        let state = self.state.upgrade().ok_or(ActorError::Stopped)?;
        let max = state.settings.load().conversations.max_live;
        let asked = live.make_room(max);
        if asked > 0 {
            state.metrics.actors_unloaded.inc_by(asked as u64);
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let arbiter = self
            .system
            .lock()
            .map_err(|_| ActorError::Stopped)?
            .arbiter
            .clone();
        let actor =
            ConversationActor::new(patient_id.to_owned(), generation, state, self.live.clone());
        let addr = ConversationActor::start_in_arbiter(&arbiter, move |_| actor);
        live.remove(patient_id);
        live.actors.insert(
            patient_id.to_owned(),
            Live {
                generation,
                addr: addr.clone(),
                used: Instant::now(),
                leaving: false,
            },
        );
        Ok(addr)
    }

    fn forget_closed(&self, patient_id: &str) {
        if let Ok(mut live) = self.live.lock()
            && live
                .actors
                .get(patient_id)
                .is_some_and(|l| !l.addr.connected())
        {
            live.remove(patient_id);
        }
    }

    /// Stops every actor (shutdown).
    pub fn stop(&self) {
        if let Ok(mut live) = self.live.lock() {
            *live = LiveMap::default();
        }
        if let Ok(mut system) = self.system.lock() {
            system.stop();
        }
    }
}

/// Removes the actor of `patient_id` from the registry if it is still generation
/// `generation`; returns whether it was.
fn forget(live: &Mutex<LiveMap>, patient_id: &str, generation: u64) -> bool {
    let Ok(mut live) = live.lock() else {
        return false;
    };
    if live
        .actors
        .get(patient_id)
        .is_some_and(|l| l.generation == generation)
    {
        live.remove(patient_id);
        true
    } else {
        false
    }
}

/// Whether the actor `generation` of `patient_id`, asked to passivate, should stop:
/// yes (and it is forgotten) unless a message took it back since; yes too if the
/// registry no longer points at it.
fn leave(live: &Mutex<LiveMap>, patient_id: &str, generation: u64) -> bool {
    let Ok(mut live) = live.lock() else {
        return true;
    };
    match live.actors.get(patient_id) {
        Some(l) if l.generation == generation => {
            let leaving = l.leaving;
            if leaving {
                live.remove(patient_id);
            }
            leaving
        }
        _ => true,
    }
}

/// Runs `work` on the main runtime and waits for it from the actor thread.
pub fn on_main<T, F>(
    handle: &tokio::runtime::Handle,
    work: F,
) -> impl Future<Output = Option<T>> + use<T, F>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let task = handle.spawn(work);
    async move {
        match task.await {
            Ok(value) => Some(value),
            Err(err) => {
                tracing::error!(error = %err, "Actor work on the main runtime failed.");
                None
            }
        }
    }
}
