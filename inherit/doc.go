// Package inherit is the worker side of upgrader and of systemd socket
// activation. It takes the listeners a process was given (LISTEN_FDS,
// sd_listen_fds(3)), binds fresh ones when it was given none, tells the
// supervisor when the process is ready (sd_notify(3)), and takes and hands
// over live connections through upgrader's handoff channel
// (UPGRADER_HANDOFF_FD, a SOCK_SEQPACKET socket, unix(7); the protocol is
// docs/reference/handoff.md).
//
// # Three ways to run
//
// The same binary runs unchanged in each; New finds out which.
//
// Under upgrader, upgrader binds the listeners and starts the worker with
// them as fds 3, 4, … and sets LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID
// (exactly as systemd does), NOTIFY_SOCKET, UPGRADER_GENERATION and
// UPGRADER_HANDOFF_FD. New takes them; Set.Listeners (every inherited stream
// listener, by name) or Set.Listen (one, by name) returns the inherited
// listeners; Ready sends READY=1, after which upgrader drains the previous
// generation; Set.Handoffs opens the channel through which that draining
// generation hands its idle keep-alive connections, and the application's
// own sessions, to this one. On the drain signal (SIGTERM) the worker
// stops accepting and drains; package drain does all of it for net/http.
//
// Under systemd socket activation, a .socket unit passes the same LISTEN_*
// variables, and with Type=notify the service gets NOTIFY_SOCKET. There is
// no UPGRADER_HANDOFF_FD: Set.Handoffs returns nil, which every method of
// Handoffs accepts, so the code is the same.
//
// Standalone, none of the variables is set: Set.Listeners returns no
// listener, Set.Listen binds the address it is given (through the
// net.ListenConfig of WithListenConfig), and Ready and Notify do nothing.
// Set.Inherited tells an inherited listener from a fresh one.
//
// # Embedded upgrades
//
// With WithUpgrades a standalone (or systemd-activated) process upgrades
// itself with tableflip (github.com/cloudflare/tableflip) on SIGUSR2 or
// SIGHUP: it starts a new copy of its binary, passing it every socket the
// Set handed out (under its name) and one end of a new handoff channel;
// the new process's New takes them, so Listen, Listeners and Handoffs work
// there as under upgrader. Ready sends MAINPID= and READY=1 and calls
// tableflip's Ready; the old process then finds Upgraded closed (package
// drain starts its drain on it) and hands its live connections straight to
// the new process over the channel, with the protocol of docs/reference/handoff.md.
// A failed upgrade is logged through WithLogger's logger, and the process
// keeps serving. Under upgrader the option is ignored.
//
// # Ownership of the fds and the environment
//
// New reads LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES and UPGRADER_HANDOFF_FD
// once and unsets them (sd_listen_fds(3) with unset_environment set, as
// go-systemd's activation.Files(true)), so that children do not inherit
// them and no second reader takes an fd twice: call it once per process.
// From then on the Set owns those fds, marked close-on-exec, and closes
// each only once it has handed out its own copy (a net.Listener,
// net.PacketConn or the Handoffs). It never closes an fd it did not take,
// not even one that UPGRADER_HANDOFF_FD names by mistake.
// NOTIFY_SOCKET stays set: the process notifies for its whole life.
//
// # Notifications
//
// Ready and Notify speak sd_notify(3). The usual states are go-systemd's
// constants, daemon.SdNotifyReady, daemon.SdNotifyStopping and
// daemon.SdNotifyWatchdog; this package does not duplicate them.
//
// # Logging
//
// The package never writes to stderr or to the global logger. Its few
// reports (a malformed handoff message dropped, a handed-off connection
// that could not be used) go to the *slog.Logger given with WithLogger;
// without one it is silent.
package inherit
