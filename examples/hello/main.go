// Command hello is the example worker: an HTTP server on inherit and drain.
// Every response names the worker's pid and generation in its body and in
// the X-Pid and X-Generation headers. ?sleep=DURATION holds the request that
// long, so that a test can keep a request in flight across an upgrade;
// ?panic=1 panics in the handler (drain.Recover turns it into a 500 and a
// clean exit 1); ?hang=1 stops the sd_notify watchdog pings, as a deadlock
// would.
//
// ?size=N answers N bytes of a fixed pattern instead of the greeting, with
// a Content-Length, written 64 KiB at a time (so 50 MB costs no 50 MB
// buffer): byte i of the body is byte(i*7 + i>>10). The pattern repeats
// every 256 KiB, and a shift by any amount short of that changes it, so a
// client can check a body's integrity against one period without keeping
// the body (integration/loadgen does, with Config.ExpectSize).
// ?tail=DURATION waits that long after the whole response is written and
// flushed before the handler returns: a handler that writes its last byte,
// then does a little more work, while the client already sends its next
// request on the same connection.
//
// -tls serves TLS on every listener, with a self-signed ECDSA P-256
// certificate made at start for 127.0.0.1, ::1 and localhost (nothing is
// read from disk: it is for tests on loopback); ALPN offers h2 and
// http/1.1, so a client that asks for HTTP/2 gets it. -h2c also accepts
// HTTP/2 with prior knowledge over cleartext (net/http's own
// unencrypted HTTP/2, Go 1.24+), besides HTTP/1.1.
//
// Under upgrader (or systemd socket activation) it serves every inherited
// stream listener, or the one named by -listener; datagram sockets and
// fd-store entries it inherits are not its business. It binds -addr only when
// no stream listener is inherited, so that it also runs on its own.
//
// -upgrades runs it in embedded mode (inherit.WithUpgrades): on SIGUSR2 or
// SIGHUP it starts a new copy of itself with tableflip, passes it the
// listeners and its idle keep-alive connections, and drains; -pid-file
// names the file that holds the serving process's pid. Under upgrader the
// flag is ignored.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/cloudflare/tableflip"
	"github.com/coreos/go-systemd/v22/daemon"

	"github.com/seed6cb0314a/upgrader/drain"
	"github.com/seed6cb0314a/upgrader/inherit"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "address to bind when no listener is inherited")
	name := flag.String("listener", "", "name of the inherited listener to serve (default: every inherited stream listener)")
	drainTimeout := flag.Duration("drain-timeout", 25*time.Second, "close what is left of the connections after this")
	useTLS := flag.Bool("tls", false, "serve TLS (self-signed certificate made at start; ALPN h2 and http/1.1)")
	h2c := flag.Bool("h2c", false, "also accept HTTP/2 with prior knowledge over cleartext")
	upgrades := flag.Bool("upgrades", false, "embedded mode: upgrade in place on SIGUSR2 or SIGHUP (tableflip), live connections included; ignored under upgrader")
	pidFile := flag.String("pid-file", "", "with -upgrades: write the serving process's pid here once it is ready")
	upgradeTimeout := flag.Duration("upgrade-timeout", 30*time.Second, "with -upgrades: how long the new process may take to become ready")
	flag.Parse()
	// Structured, like the supervisor's own logs, so that a log pipeline
	// parses the worker's lines too.
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("worker", "hello", "pid", os.Getpid())
	fatal := func(err error) {
		log.Error("exiting", "error", err)
		os.Exit(1)
	}

	opts := []inherit.Option{inherit.WithLogger(log)}
	if *upgrades {
		opts = append(opts, inherit.WithUpgrades(tableflip.Options{PIDFile: *pidFile, UpgradeTimeout: *upgradeTimeout}))
	}
	fds, err := inherit.New(opts...)
	if err != nil {
		fatal(err)
	}
	listeners, err := listen(fds, *name, *addr)
	if err != nil {
		fatal(err)
	}
	for _, l := range listeners {
		log.Info("serving", "addr", l.Addr().String(), "inherited", fds.Inherited(l), "tls", *useTLS, "h2c", *h2c)
	}
	if *useTLS {
		cfg, err := selfSigned()
		if err != nil {
			fatal(err)
		}
		// drain.Serve takes net.Listeners, so TLS goes on the listeners
		// (net/http then negotiates h2 by ALPN itself) rather than through
		// srv.TLSConfig and ServeTLS.
		for i, l := range listeners {
			listeners[i] = tls.NewListener(l, cfg)
		}
	}

	var hung atomic.Bool
	mux := http.NewServeMux()
	mux.Handle("/", handler(strconv.Itoa(os.Getpid()), strconv.Itoa(inherit.Generation()), &hung))
	// Live connections: take idle keep-alive connections from a draining
	// generation, and hand ours to the next one (nil when not offered).
	handoffs, err := fds.Handoffs(inherit.KindHTTP)
	if err != nil {
		fatal(err)
	}
	d := drain.New(newServer(mux, log, *h2c, *useTLS), drain.Options{Timeout: *drainTimeout, Handoff: handoffs, Logger: log})
	pingWatchdog(d, &hung)
	if err := d.Serve(context.Background(), listeners); err != nil {
		fatal(err)
	}
}

// query is what a request's query asks of hello (see the package
// documentation): hold it for sleep, answer size bytes of the pattern (-1:
// the greeting), then hold it for tail.
type query struct {
	sleep, tail time.Duration
	size        int64
}

// parseQuery reads ?sleep=, ?tail= and ?size=; the error is the answer to
// a bad one.
func parseQuery(q url.Values) (query, error) {
	a := query{size: -1}
	for _, arg := range []struct {
		name string
		d    *time.Duration
	}{{"sleep", &a.sleep}, {"tail", &a.tail}} {
		if v := q.Get(arg.name); v != "" {
			d, err := time.ParseDuration(v)
			if err != nil {
				return query{}, errors.New(arg.name + ": " + err.Error())
			}
			*arg.d = d
		}
	}
	if v := q.Get("size"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			return query{}, errors.New("size: want a byte count")
		}
		a.size = n
	}
	return a, nil
}

// handler answers every request with the worker's pid and generation, as
// its query asks; ?hang=1 sets hung.
func handler(pid, gen string, hung *atomic.Bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		q := r.URL.Query()
		if q.Get("panic") != "" {
			panic("hello: asked to panic")
		}
		if q.Get("hang") != "" {
			hung.Store(true)
		}
		a, err := parseQuery(q)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		time.Sleep(a.sleep)
		w.Header().Set("X-Pid", pid)
		w.Header().Set("X-Generation", gen)
		if a.size < 0 {
			fmt.Fprintf(w, "hello from pid %s generation %s\n", pid, gen)
		} else {
			w.Header().Set("Content-Type", "application/octet-stream")
			w.Header().Set("Content-Length", strconv.FormatInt(a.size, 10))
			if writePattern(w, a.size) != nil {
				return // the client has gone; net/http closes the connection
			}
		}
		if a.tail > 0 {
			// The whole response is on its way before the extra work, so
			// the client can send its next request during it.
			if http.NewResponseController(w).Flush() != nil {
				return
			}
			time.Sleep(a.tail)
		}
	}
}

// newServer is hello's http.Server for h: its own reports go to log, and
// with h2c it also takes HTTP/2 with prior knowledge over cleartext.
func newServer(h http.Handler, log *slog.Logger, h2c, useTLS bool) *http.Server {
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		// net/http's own reports (accept errors, TLS handshakes, panics)
		// would otherwise go out as bare standard-library log lines.
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	if h2c {
		srv.Protocols = new(http.Protocols)
		srv.Protocols.SetHTTP1(true)
		srv.Protocols.SetUnencryptedHTTP2(true)
		// Setting Protocols replaces the default set, which includes
		// HTTP/2 over TLS: keep it for -tls -h2c.
		srv.Protocols.SetHTTP2(useTLS)
	}
	return srv
}

// pingWatchdog pings the sd_notify watchdog, when there is one, at half
// its interval (sd_watchdog_enabled(3)) while hung is not set.
func pingWatchdog(d *drain.Server, hung *atomic.Bool) {
	every, err := daemon.SdWatchdogEnabled(false)
	if err != nil || every <= 0 {
		return
	}
	d.Go(func() {
		for range time.Tick(every / 2) {
			if !hung.Load() {
				inherit.Notify(daemon.SdNotifyWatchdog)
			}
		}
	})
}

// listen returns the listener called name (inherited, or bound on addr), or
// without a name every inherited stream listener, binding addr only when
// none was inherited.
func listen(fds *inherit.Set, name, addr string) ([]net.Listener, error) {
	if name == "" {
		byName, err := fds.Listeners()
		if err != nil {
			return nil, err
		}
		var all []net.Listener
		for _, ls := range byName {
			all = append(all, ls...)
		}
		if len(all) > 0 {
			return all, nil
		}
	}
	l, err := fds.Listen(name, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return []net.Listener{l}, nil
}

// period is one period of the ?size= body pattern: byte i is
// byte(i*7 + i>>10), which repeats every 256 KiB (i*7 mod 256 every 256
// bytes, i>>10 mod 256 every 256 KiB).
var period = func() []byte {
	b := make([]byte, 256<<10)
	for i := range b {
		b[i] = byte(i*7 + i>>10)
	}
	return b
}()

// writePattern writes the first n bytes of the pattern to w, 64 KiB at a
// time (a 64 KiB chunk never straddles the period's end).
func writePattern(w io.Writer, n int64) error {
	const chunk = 64 << 10
	for off := int64(0); off < n; {
		start := int(off % int64(len(period)))
		m := int(min(chunk, n-off))
		if _, err := w.Write(period[start : start+m]); err != nil {
			return err
		}
		off += int64(m)
	}
	return nil
}

// selfSigned makes a TLS config with a fresh self-signed ECDSA P-256
// certificate for the loopback names, offering h2 and http/1.1 by ALPN.
func selfSigned() (*tls.Config, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "hello"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}},
		NextProtos:   []string{"h2", "http/1.1"},
	}, nil
}
