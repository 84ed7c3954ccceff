package integration

import (
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
)

// upgradeCmd runs `upgrader upgrade` against p and returns its output and
// error.
func (p *proc) upgradeCmd() (string, error) {
	out, err := exec.Command(upgraderBin, "upgrade", "--control", p.control, "--timeout", "60s").CombinedOutput()
	return string(out), err
}

// `upgrader upgrade` asked for while a self-upgrade checks its binary is
// queued behind it and run by the new image: the command follows it
// across the exec, which closes its connection, and reports the upgrade's
// end, not a failure.
func TestUpgradeFollowedAcrossASelfUpgrade(t *testing.T) {
	p, bin := startSelfUpgradable(t, "-l", "127.0.0.1:0", "--", helloBin)
	p.waitReady(1)
	l := startLoad(loadgen.Config{Addr: p.addr(""), Clients: 8, Mode: loadgen.KeepAlive})
	installBin(t, upgraderBin, bin)
	selfDone := make(chan error, 1)
	go func() {
		out, err := p.selfUpgrade(true)
		if err != nil {
			err = &selfErr{err, out}
		}
		selfDone <- err
	}()
	// The self-check is under way (the race-built binary takes a while to
	// start): the worker upgrade asked for now waits for the exec.
	p.expectLogged(10*time.Second, "the self-check started", func(r map[string]any) bool {
		return r["msg"] == "self-upgrade: checking the new binary"
	})
	out, err := p.upgradeCmd()
	if err != nil || !strings.Contains(out, "done: generation 2 serving") {
		t.Fatalf("upgrade during the self-upgrade: %v, output %q; want it followed to done: generation 2 serving", err, out)
	}
	if err := <-selfDone; err != nil {
		t.Fatalf("the self-upgrade: %v", err)
	}
	st := p.status()
	if st.Execs != 1 || st.Current != 2 || !st.Ready || st.LastUpgrade == nil || !st.LastUpgrade.OK || st.LastUpgrade.Generation != 2 {
		t.Fatalf("after both: execs %d current %d ready %v last upgrade %+v; want 1, 2, ready, generation 2 ok", st.Execs, st.Current, st.Ready, st.LastUpgrade)
	}
	if !strings.Contains(out, "queued behind the self-upgrade") {
		t.Logf("the upgrade was not queued behind the self-upgrade (it ran before the exec): %q", out)
	}
	l.waitServed(t, 2, 20)
	requireNoFailures(t, l.stop())
}

type selfErr struct {
	err error
	out string
}

func (e *selfErr) Error() string { return e.err.Error() + ": " + e.out }
