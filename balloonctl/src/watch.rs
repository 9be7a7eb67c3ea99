//! `balloonctl watch`: the `list` table redrawn every interval on the
//! terminal's alternate screen until q (or Ctrl-C) is pressed.

use std::io::Write;
use std::time::Duration;

use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyModifiers};
use crossterm::{cursor, execute, terminal};

use crate::error::CtlError;

fn io_error(error: std::io::Error) -> CtlError {
    CtlError::Other(format!("terminal: {error}"))
}

/// Puts the terminal back however `watch` ends.
struct Screen;

impl Screen {
    fn enter() -> Result<Screen, CtlError> {
        terminal::enable_raw_mode().map_err(io_error)?;
        let screen = Screen;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )
        .map_err(io_error)?;
        Ok(screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        // Nothing better to do with an error while restoring the terminal.
        if let Err(error) = execute!(
            std::io::stdout(),
            cursor::Show,
            terminal::LeaveAlternateScreen
        ) {
            eprintln!("balloonctl: restoring the screen: {error}");
        }
        if let Err(error) = terminal::disable_raw_mode() {
            eprintln!("balloonctl: leaving raw mode: {error}");
        }
    }
}

fn quits(key: &KeyEvent) -> bool {
    matches!(
        key.code,
        KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc
    ) || (key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL))
}

/// Redraws `render()` every `interval` until a quit key.
pub fn watch(render: impl Fn() -> String, interval: Duration) -> Result<(), CtlError> {
    let _screen = Screen::enter()?;
    let mut stdout = std::io::stdout();
    loop {
        let body = render();
        execute!(
            stdout,
            cursor::MoveTo(0, 0),
            terminal::Clear(terminal::ClearType::All)
        )
        .map_err(io_error)?;
        // Raw mode: every line needs its carriage return.
        let text = format!(
            "balloonctl watch: every {} s, q quits\r\n\r\n{}",
            interval.as_secs(),
            body.replace('\n', "\r\n")
        );
        stdout.write_all(text.as_bytes()).map_err(io_error)?;
        stdout.flush().map_err(io_error)?;
        if event::poll(interval).map_err(io_error)? {
            if let Event::Key(key) = event::read().map_err(io_error)? {
                if quits(&key) {
                    return Ok(());
                }
            }
        }
    }
}
