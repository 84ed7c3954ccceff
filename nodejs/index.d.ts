import type { Server } from 'net';

export interface ServeOptions {
  /** The upgrader listener to serve (a name in LISTEN_FDNAMES); without it, the first listener. */
  name?: string;
  /** Where to listen when not under upgrader (no such listener in LISTEN_FDS). */
  port?: number;
  host?: string;
  /** A Unix socket path to listen on when not under upgrader (instead of port). */
  path?: string;
  /** The handoff kind this server's plain connections are, default "http". */
  kind?: string;
  /** Send ready once listening (default true). Set false with several servers and call ready() yourself. */
  ready?: boolean;
  /** With `--ready fd:N` and no IPC channel: the fd N to write the ready newline to. */
  readyFd?: number;
  /** Milliseconds after the drain begins to close what is left and exit (default 30000). Process-wide. */
  drainTimeout?: number;
  /** Milliseconds a connection that cannot be handed off may stay quiet before it is closed (default 1000). Process-wide. */
  idleGrace?: number;
  /** On an uncaught exception: log it, send stopping, drain, exit 1 (default true). Process-wide. */
  exitOnUncaught?: boolean;
  /** Call process.exit when drained (default true). Process-wide. */
  exit?: boolean;
  /** Called when the drain begins; a returned promise is awaited before the exit (within drainTimeout). */
  onDrain?: () => void | Promise<void>;
  /** Where the module's few log lines go (default: stderr). */
  log?: (msg: string) => void;
}

export interface Controller<S extends Server = Server> {
  readonly server: S;
  /** The inherited fd served, or null when bound fresh. */
  readonly fd: number | null;
  readonly draining: boolean;
  /** Begin the drain now, as SIGTERM does; resolves with the exit code once drained. */
  drain(): Promise<number>;
  status(text: string): boolean;
}

/** Listen, tell upgrader, and drain right on SIGTERM. */
export function serve<S extends Server>(server: S, options?: ServeOptions): Controller<S>;
/** The inherited listeners by name ({name: fd}); LISTEN_* are removed from process.env on the first call. */
export function listenFds(): Record<string, number>;
/** Tell upgrader this worker serves (once); serve() does it unless ready: false. */
export function ready(): void;
/** Set the status line shown by `upgrader status`; false without an IPC channel. */
export function status(text: string): boolean;
/** Ask upgrader to replace this worker now (STOPPING=1); the drain follows on its SIGTERM. */
export function stopping(): void;
/** Begin the drain now, as SIGTERM does. */
export function drain(): Promise<number>;
export const draining: boolean;
/** 'drain': the drain began; 'drained': nothing is left (with the exit code), just before the exit. */
export function on(event: 'drain', listener: () => void): void;
export function on(event: 'drained', listener: (code: number) => void): void;
