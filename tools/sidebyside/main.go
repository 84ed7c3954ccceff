// Command sidebyside runs the same raw load (integration/loadgen) against
// upgrader and against the tools a user would pick instead, through the
// same reloads, and writes what every request saw: a markdown table into a
// section of docs/benchmarks.md (between the side-by-side marker comments,
// so that one run regenerates it), with the latency of the OK requests
// during the reloads beside that of a steady run of the same load, and a
// picture of OK requests and their p99 latency per 100 ms over time with
// every reload and every failure marked.
//
// The systems: upgrader supervising examples/hello (USR2), nginx reloaded
// (HUP) and upgraded on the fly (USR2, then QUIT to the old master),
// HAProxy in master-worker mode (USR2), a bare tableflip server
// (integration/cmd/bareflip, USR2), a Node.js cluster restarting its
// workers one by one (cluster.js, USR2), upgrader --ipc node supervising
// examples/node/server.js (the nodejs/ module) with as many workers as the
// cluster (USR2), and upgrader supervising an unchanged Go server
// (integration/cmd/plainhttp: Serve on fd 3, Shutdown on SIGTERM; USR2).
// nginx, HAProxy and Node.js must be installed (scripts/sidebyside
// installs them); upgrader, hello, bareflip and plainhttp are built from
// -repo. Every process runs on 127.0.0.1 as this tool's child, in a temp
// dir, and is stopped by pid at the end of its run.
//
//	go run . -repo ../.. -rounds 3
//
// It is a benchmark: it prints figures and asserts nothing about them.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
)

func main() {
	o := defaultOptions()
	systemsFlag := flag.String("systems", strings.Join(systemNames(), ","), "systems to run, comma-separated, in table order")
	modesFlag := flag.String("modes", "new,keepalive", "load modes: new (a connection per request), keepalive")
	flag.StringVar(&o.Repo, "repo", "../..", "the upgrader repository's root")
	flag.IntVar(&o.Rounds, "rounds", o.Rounds, "rounds of every system and mode")
	flag.IntVar(&o.Reloads, "reloads", o.Reloads, "reloads per run")
	flag.DurationVar(&o.Interval, "interval", o.Interval, "time between reloads")
	flag.IntVar(&o.Clients, "clients", o.Clients, "concurrent clients")
	flag.DurationVar(&o.MaxIdle, "idle", o.MaxIdle, "keepalive: random idle gap up to this between requests")
	flag.BoolVar(&o.Steady, "steady", o.Steady, "also run every system and load as long with no reload, for the latency ratios (doubles the load time)")
	upFlags := flag.String("upgrader-flags", "", "flags added to every upgrader command line, space-separated (to measure an option against the defaults)")
	md := flag.String("md", "", "markdown file whose side-by-side section is rewritten (default: REPO/docs/benchmarks.md; - for none)")
	png := flag.String("png", "", "picture to write (default: REPO/docs/benchmarks/side-by-side.png)")
	flag.Parse()
	o.UpgraderFlags = strings.Fields(*upFlags)
	o.Systems = strings.Split(*systemsFlag, ",")
	o.Modes = nil
	for _, m := range strings.Split(*modesFlag, ",") {
		if m != string(loadgen.NewConn) && m != string(loadgen.KeepAlive) {
			fatalf("-modes: %q: want new or keepalive", m)
		}
		o.Modes = append(o.Modes, loadgen.Mode(m))
	}
	if err := o.check(); err != nil {
		fatalf("%v", err)
	}
	if *md == "" {
		*md = filepath.Join(o.Repo, "docs", "benchmarks.md")
	}
	if *png == "" {
		*png = filepath.Join(o.Repo, "docs", "benchmarks", "side-by-side.png")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	o.Log = os.Stderr
	began := time.Now()
	runs, err := Bench(ctx, o)
	if err != nil {
		fatalf("%v", err)
	}
	elapsed := time.Since(began)
	rel, err := filepath.Rel(filepath.Dir(*md), *png)
	if err != nil {
		rel = *png
	}
	if err := writeOutputs(o, runs, *md, *png, rel, command(flag.CommandLine), elapsed); err != nil {
		fatalf("%v", err)
	}
	fmt.Print(Table(o, runs))
	fmt.Print("\n" + LatencyTable(o, runs))
	fmt.Printf("\n%d runs in %s; picture %s\n", len(runs), elapsed.Round(time.Second), *png)
}

func defaultOptions() Options {
	return Options{
		Systems: systemNames(), Modes: []loadgen.Mode{loadgen.NewConn, loadgen.KeepAlive},
		Rounds: 3, Reloads: 20, Interval: 500 * time.Millisecond, Lead: time.Second, Tail: 1500 * time.Millisecond,
		Clients: 16, MaxIdle: 50 * time.Millisecond, RequestTimeout: 5 * time.Second, Steady: true,
	}
}

// check refuses options that would not make a bounded run, and systems
// whose executables are missing.
func (o Options) check() error {
	switch {
	case o.Rounds < 1 || o.Rounds > 20:
		return fmt.Errorf("-rounds %d: want 1 to 20", o.Rounds)
	case o.Reloads < 1 || o.Reloads > 200:
		return fmt.Errorf("-reloads %d: want 1 to 200", o.Reloads)
	case o.Interval < 50*time.Millisecond || o.Interval > 10*time.Second:
		return fmt.Errorf("-interval %s: want 50ms to 10s", o.Interval)
	case o.Clients < 1 || o.Clients > 1000:
		return fmt.Errorf("-clients %d: want 1 to 1000", o.Clients)
	case o.MaxIdle < 0 || o.MaxIdle > 10*time.Second:
		return fmt.Errorf("-idle %s: want 0 to 10s", o.MaxIdle)
	}
	for _, name := range o.Systems {
		s, ok := systemNamed(name)
		if !ok {
			return fmt.Errorf("-systems: %q: want some of %s", name, strings.Join(systemNames(), ","))
		}
		if m := s.missing(); len(m) > 0 {
			return fmt.Errorf("system %s needs %s, not installed (scripts/sidebyside installs it)", name, strings.Join(m, " and "))
		}
	}
	return nil
}

func systemNames() []string {
	var n []string
	for _, s := range systems {
		n = append(n, s.name)
	}
	return n
}

// command is how this run was invoked, for the docs section: each flag
// that was set, once, with the value it ended with (scripts/sidebyside
// passes -rounds 3 before the caller's own, which may set it again),
// quoted for a POSIX shell where it needs to be.
func command(fs *flag.FlagSet) string {
	args := []string{"go run ."}
	fs.Visit(func(f *flag.Flag) {
		if b, ok := f.Value.(interface{ IsBoolFlag() bool }); ok && b.IsBoolFlag() {
			args = append(args, "-"+f.Name+"="+f.Value.String())
			return
		}
		args = append(args, "-"+f.Name, shellQuote(f.Value.String()))
	})
	return strings.Join(args, " ")
}

func shellQuote(v string) string {
	if v != "" && !strings.ContainsAny(v, " \t\n'\"\\$`*?[]{}()<>|&;#~!") {
		return v
	}
	return "'" + strings.ReplaceAll(v, "'", `'\''`) + "'"
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "sidebyside: "+format+"\n", args...)
	os.Exit(1)
}
