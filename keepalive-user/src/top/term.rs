//! The terminal side of `keepalive top`: raw mode and the alternate
//! screen, restored on every way out (a guard's `Drop`, and a panic hook
//! for panics), and the loop that reads keys, takes in the engine's
//! updates and redraws.

use std::io::{Stdout, stdout};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::crossterm::terminal::{
    EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode,
};
use ratatui::crossterm::{cursor, execute};

use super::app::{App, Key};
use super::model::{Model, Update};
use super::ui::{Theme, draw};
use crate::output::Clock;

/// Longest stretch spent taking in updates before keys are looked at.
const INGEST_SLICE: Duration = Duration::from_millis(50);
/// Longest wait for a key, so updates keep being taken in.
const KEY_POLL: Duration = Duration::from_millis(25);

/// Puts the terminal back: main screen, cursor, cooked mode. Safe to call
/// more than once.
pub fn restore() {
    let _ = disable_raw_mode();
    let _ = execute!(stdout(), LeaveAlternateScreen, cursor::Show);
}

/// The terminal in raw mode on the alternate screen, until dropped.
pub struct TerminalGuard {
    pub terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl TerminalGuard {
    pub fn enter() -> Result<TerminalGuard> {
        // A panic anywhere restores the screen before its message is shown.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        enable_raw_mode().context("switching the terminal to raw mode")?;
        let guard = TerminalGuard {
            terminal: Terminal::new(CrosstermBackend::new(stdout()))
                .context("opening the terminal")?,
        };
        execute!(stdout(), EnterAlternateScreen, cursor::Hide)
            .context("switching to the alternate screen")?;
        Ok(guard)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
    }
}

pub fn map_key(k: KeyEvent) -> Option<Key> {
    Some(match k.code {
        KeyCode::Char(c) if k.modifiers.contains(KeyModifiers::CONTROL) => Key::Ctrl(c),
        KeyCode::Char(c) => Key::Char(c),
        KeyCode::Up => Key::Up,
        KeyCode::Down => Key::Down,
        KeyCode::PageUp => Key::PageUp,
        KeyCode::PageDown => Key::PageDown,
        KeyCode::Home => Key::Home,
        KeyCode::End => Key::End,
        KeyCode::Enter => Key::Enter,
        KeyCode::Esc => Key::Esc,
        KeyCode::Tab => Key::Tab,
        KeyCode::BackTab => Key::BackTab,
        KeyCode::Backspace => Key::Backspace,
        _ => return None,
    })
}

/// The terminal hung up (the SSH session or the terminal window went
/// away): nothing can be shown any more.
fn hung_up() -> bool {
    let mut pfd = libc::pollfd {
        fd: 0,
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// Reads terminal events on a thread of their own: crossterm's reader can
/// spin on a terminal that hung up, and the screen loop must stay free to
/// notice that the monitor stopped. The thread ends with the process.
fn spawn_reader() -> Result<Receiver<Event>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("keys".into())
        .spawn(move || {
            while let Ok(ev) = event::read() {
                if tx.send(ev).is_err() {
                    break;
                }
            }
        })
        .context("starting the key reader")?;
    Ok(rx)
}

/// Runs the screen until the user quits or the monitor stops.
pub fn run_ui(
    rx: &Receiver<Update>,
    model: &mut Model,
    interval: Duration,
    dropped: &AtomicU64,
    engine: &JoinHandle<Result<()>>,
) -> Result<()> {
    let theme = Theme::from_env();
    let mut guard = TerminalGuard::enter()?;
    let keys = spawn_reader()?;
    let mut app = App::default();
    let mut next_frame = Instant::now();
    let mut dirty = true;
    loop {
        let until = Instant::now() + INGEST_SLICE;
        loop {
            match rx.try_recv() {
                Ok(u) => {
                    model.apply(u);
                    if Instant::now() >= until {
                        break;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    model.stopped = true;
                    break;
                }
            }
        }
        model.ui_dropped = dropped.load(Ordering::Relaxed);
        if model.stopped || engine.is_finished() || hung_up() {
            return Ok(());
        }
        let now = Instant::now();
        if dirty || now >= next_frame {
            model.tick(Clock::mono_now_ns());
            app.sync(model);
            guard
                .terminal
                .draw(|f| draw(f, &mut app, model, &theme))
                .context("drawing the screen")?;
            dirty = false;
            if now >= next_frame {
                next_frame = now + interval;
            }
        }
        let wait = next_frame
            .saturating_duration_since(Instant::now())
            .min(KEY_POLL);
        match keys.recv_timeout(wait) {
            Ok(Event::Key(k)) if k.kind != KeyEventKind::Release => {
                if let Some(key) = map_key(k) {
                    app.key(key, model);
                    dirty = true;
                    if app.quit {
                        return Ok(());
                    }
                }
            }
            Ok(Event::Resize(..)) => dirty = true,
            Ok(_) | Err(RecvTimeoutError::Timeout) => {}
            // The reader ended: the terminal is gone.
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}
