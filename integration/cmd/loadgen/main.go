// Command loadgen runs integration/loadgen against a server and prints what
// it saw; it exits 1 when any request failed.
//
//	go run ./integration/cmd/loadgen -addr 127.0.0.1:8080 -clients 16 -mode keepalive -idle 50ms -duration 10s
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
)

func main() {
	var cfg loadgen.Config
	var mode string
	asJSON := flag.Bool("json", false, "print the result as JSON")
	flag.StringVar(&cfg.Addr, "addr", "127.0.0.1:8080", "server address: HOST:PORT, or a path with -network unix")
	flag.StringVar(&cfg.Network, "network", "tcp", "tcp or unix")
	flag.StringVar(&cfg.Path, "path", "/", "request target")
	flag.IntVar(&cfg.Clients, "clients", 16, "concurrent clients")
	flag.StringVar(&mode, "mode", "new", "new (a connection per request) or keepalive")
	flag.DurationVar(&cfg.Duration, "duration", 10*time.Second, "how long to run (at most 10m)")
	flag.IntVar(&cfg.Requests, "requests", 0, "requests per client (0: until -duration)")
	flag.DurationVar(&cfg.MaxIdle, "idle", 0, "keepalive: random idle gap up to this between requests")
	flag.DurationVar(&cfg.Timeout, "timeout", 10*time.Second, "per-request timeout")
	flag.Parse()
	cfg.Mode = loadgen.Mode(mode)
	if cfg.Mode != loadgen.NewConn && cfg.Mode != loadgen.KeepAlive {
		fmt.Fprintf(os.Stderr, "loadgen: -mode %q: want new or keepalive\n", mode)
		os.Exit(2)
	}
	if cfg.Duration <= 0 || cfg.Duration > 10*time.Minute {
		fmt.Fprintf(os.Stderr, "loadgen: -duration %s: want more than 0 and at most 10m\n", cfg.Duration)
		os.Exit(2)
	}
	r := loadgen.Run(context.Background(), cfg)
	if *asJSON {
		json.NewEncoder(os.Stdout).Encode(r)
	} else {
		fmt.Println(r)
	}
	if r.Failed() > 0 {
		os.Exit(1)
	}
}
