// Command loadgen runs integration/loadgen against a server and prints what
// it saw; it exits 1 when any request failed. SIGINT or SIGTERM ends the
// run early: the requests in flight finish, and the result is printed.
//
// With -responses, every OK response is also printed on stdout as it
// comes, as a line "response GENERATION UNIXNANO" (its X-Generation and
// when its status line arrived), for a test that checks which generation
// served when; the result follows them.
//
//	go run ./integration/cmd/loadgen -addr 127.0.0.1:8080 -clients 16 -mode keepalive -idle 50ms -duration 10s
//	go run ./integration/cmd/loadgen -tls -path '/?size=52428800' -expect-size 52428800 -mode keepalive
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
)

func main() {
	var cfg loadgen.Config
	var mode string
	asJSON := flag.Bool("json", false, "print the result as JSON (one line)")
	responses := flag.Bool("responses", false, "print a line per OK response: response GENERATION UNIXNANO")
	flag.StringVar(&cfg.Addr, "addr", "127.0.0.1:8080", "server address: HOST:PORT, or a path with -network unix")
	flag.StringVar(&cfg.Network, "network", "tcp", "tcp or unix")
	flag.StringVar(&cfg.Path, "path", "/", "request target")
	flag.IntVar(&cfg.Clients, "clients", 16, "concurrent clients")
	flag.StringVar(&mode, "mode", "new", "new (a connection per request), keepalive, or h2 (HTTP/2: over TLS with -tls, else h2c)")
	flag.DurationVar(&cfg.Duration, "duration", 10*time.Second, "how long to run (at most 10m)")
	flag.IntVar(&cfg.Requests, "requests", 0, "requests per client (0: until -duration)")
	flag.DurationVar(&cfg.MaxIdle, "idle", 0, "keepalive and h2: random idle gap up to this between requests")
	flag.DurationVar(&cfg.Timeout, "timeout", 10*time.Second, "per-request timeout")
	useTLS := flag.Bool("tls", false, "connect with TLS (HTTP/1.1 by ALPN; the certificate is not verified)")
	flag.Int64Var(&cfg.ExpectSize, "expect-size", 0, "check every OK body against examples/hello's ?size= pattern of this many bytes (0: no check)")
	flag.Parse()
	if *useTLS {
		// For test servers such as examples/hello -tls, whose certificate
		// is self-signed.
		cfg.TLS = &tls.Config{InsecureSkipVerify: true}
	}
	cfg.Mode = loadgen.Mode(mode)
	if cfg.Mode != loadgen.NewConn && cfg.Mode != loadgen.KeepAlive && cfg.Mode != loadgen.HTTP2 {
		fmt.Fprintf(os.Stderr, "loadgen: -mode %q: want new, keepalive or h2\n", mode)
		os.Exit(2)
	}
	if cfg.Duration <= 0 || cfg.Duration > 10*time.Minute {
		fmt.Fprintf(os.Stderr, "loadgen: -duration %s: want more than 0 and at most 10m\n", cfg.Duration)
		os.Exit(2)
	}
	if *responses {
		var mu sync.Mutex // the clients' goroutines call it at once
		cfg.OnResponse = func(gen string, at time.Time) {
			mu.Lock()
			defer mu.Unlock()
			fmt.Printf("response %s %d\n", gen, at.UnixNano())
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	r := loadgen.Run(ctx, cfg)
	if *asJSON {
		json.NewEncoder(os.Stdout).Encode(r)
	} else {
		fmt.Println(r)
	}
	if r.Failed() > 0 {
		os.Exit(1)
	}
}
