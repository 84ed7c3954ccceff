package main

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// defaults parses an empty command line, so each case changes one flag of
// what an operator gets.
func defaults(t *testing.T, args ...string) (runFlags, error) {
	t.Helper()
	f, err := parseRunFlags(append(args, "--", "true"))
	if err != nil {
		return f, err
	}
	_, err = f.config()
	return f, err
}

func TestFlagValuesRejectedNotReplaced(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string // "" = accepted
	}{
		{nil, ""},
		{[]string{"--ready-timeout", "-1s"}, "--ready-timeout -1s"},
		{[]string{"--ready-timeout", "0"}, "--ready-timeout 0"},
		{[]string{"--drain-timeout", "-30s"}, "--drain-timeout -30s"},
		{[]string{"--drain-timeout", "0s"}, "--drain-timeout 0"},
		{[]string{"--restart-window", "-1m"}, "--restart-window -1m0s"},
		{[]string{"--restart-window", "0"}, "--restart-window 0"},
		{[]string{"--shutdown-delay", "-1s"}, "--shutdown-delay -1s"},
		{[]string{"--shutdown-delay", "0"}, ""},
		{[]string{"--watchdog", "-5s"}, "--watchdog -5s"},
		{[]string{"--watchdog", "0"}, ""},
		{[]string{"--watchdog", "5s"}, ""},
		{[]string{"--max-restarts", "-1"}, "--max-restarts -1"},
		{[]string{"--max-restarts", "0"}, ""},
		{[]string{"--fd-store-max", "-1"}, "--fd-store-max -1"},
		{[]string{"--fd-store-max", "0"}, ""},
		{[]string{"--max-draining", "0"}, "--max-draining 0"},
		{[]string{"--max-draining", "1"}, ""},
		{[]string{"--workers", "0"}, "--workers 0"},
		{[]string{"--ipc", "node"}, ""},
		{[]string{"--ipc", "Node"}, "--ipc Node"},
		{[]string{"--ipc", "cluster"}, "--ipc cluster"},
	} {
		_, err := defaults(t, tc.args...)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%q: %v, want accepted", tc.args, err)
		case tc.want != "" && (err == nil || !errors.Is(err, errUsage) || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%q: %v, want a usage error naming %q", tc.args, err, tc.want)
		}
	}
}

// The supervisor gives 0 a meaning of its own (give up at once, fd store
// off): main must not turn it back into the default.
func TestFlagValuesPassedThrough(t *testing.T) {
	f, err := defaults(t)
	if err != nil {
		t.Fatal(err)
	}
	if f.maxRestarts != 5 || f.fdStoreMax != 64 || f.maxDraining != 4 || f.restartWindow != time.Minute {
		t.Fatalf("defaults: %+v", f)
	}
	f, err = defaults(t, "--max-restarts", "0", "--fd-store-max", "0", "--max-draining", "2")
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := f.config()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.MaxRestarts != 0 || cfg.FDStoreMax != 0 || cfg.MaxDraining != 2 {
		t.Fatalf("config: MaxRestarts %d FDStoreMax %d MaxDraining %d, want 0 0 2", cfg.MaxRestarts, cfg.FDStoreMax, cfg.MaxDraining)
	}
}

func TestParseListenersRejectsDuplicateNames(t *testing.T) {
	for _, tc := range []struct {
		listen, inherited []string
		want              []string // substrings of the error; nil = accepted
	}{
		{listen: []string{"web=127.0.0.1:0", "admin=127.0.0.1:0"}},
		{listen: []string{"127.0.0.1:8080", "127.0.0.1:8081"}},
		// Names are case-sensitive, as systemd's FileDescriptorName= and
		// sd_listen_fds_with_names(3) are: a and A are two listeners.
		{listen: []string{"a=127.0.0.1:0", "A=127.0.0.1:0"}},
		// systemd names every fd of a socket unit alike: not ours to refuse.
		{listen: []string{"web=127.0.0.1:0"}, inherited: []string{"app.socket", "app.socket"}},
		{listen: []string{"web=127.0.0.1:0", "web=unix:///run/w.sock"},
			want: []string{`--listen "web=unix:///run/w.sock"`, `--listen "web=127.0.0.1:0"`, `"web"`}},
		{listen: []string{"127.0.0.1:8080", "tcp://127.0.0.1:8080"},
			want: []string{`--listen "tcp://127.0.0.1:8080"`, `--listen "127.0.0.1:8080"`, `"tcp-127.0.0.1-8080"`}},
		{listen: []string{"tcp-127.0.0.1-8080=unix:///x", "127.0.0.1:8080"},
			want: []string{`--listen "127.0.0.1:8080"`, `--listen "tcp-127.0.0.1-8080=unix:///x"`}},
		{listen: []string{"http=127.0.0.1:0"}, inherited: []string{"admin", "http"},
			want: []string{`--listen "http=127.0.0.1:0"`, "socket-activated fd 4", "LISTEN_FDNAMES", `"http"`}},
		{listen: []string{"bad=sctp://x:1"}, want: []string{"--listen", "sctp"}},
	} {
		specs, err := parseListeners(tc.listen, tc.inherited)
		if tc.want == nil {
			if err != nil || len(specs) != len(tc.listen) {
				t.Errorf("%q %q: %v, want accepted", tc.listen, tc.inherited, err)
			}
			continue
		}
		if err == nil || !errors.Is(err, errUsage) {
			t.Errorf("%q %q: %v, want a usage error", tc.listen, tc.inherited, err)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%q %q: %v, want it to name %s", tc.listen, tc.inherited, err, w)
			}
		}
	}
}

// The self-check takes the command line the exec will give it through
// what run does before starting anything.
func TestCheckRunArgs(t *testing.T) {
	for _, ok := range [][]string{
		{"-l", "127.0.0.1:0", "--max-draining", "3", "--", "true"},
		{"run", "--workers", "2", "--", "true"},
	} {
		if err := checkRunArgs(ok); err != nil {
			t.Errorf("checkRunArgs(%q): %v, want nil", ok, err)
		}
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--max-draining-gens", "3", "--", "true"}, "unknown flag: --max-draining-gens"},
		{[]string{"--workers", "0", "--", "true"}, "--workers"},
		{[]string{"-l", "nonsense://x", "--", "true"}, "nonsense"},
		{[]string{"--log-level", "loud", "--", "true"}, "--log-level"},
		{[]string{"--ready", "later", "--", "true"}, "later"},
		{[]string{"--workers", "2"}, "no COMMAND"},
		{[]string{"status"}, "not one of upgrader run"},
	} {
		err := checkRunArgs(c.args)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("checkRunArgs(%q): %v, want an error naming %q", c.args, err, c.want)
		}
	}
}
