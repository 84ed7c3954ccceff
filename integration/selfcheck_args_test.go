package integration

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
)

// A build of upgrader whose --max-draining is renamed --max-draining-gens,
// as a release that dropped a flag would be: the same source with one line
// changed, through go build -overlay (no copy of the tree), built once.
var (
	renamedOnce sync.Once
	renamedBin  string
	renamedErr  error
)

func upgraderRenamedFlag(t *testing.T) string {
	t.Helper()
	renamedOnce.Do(func() {
		dir := filepath.Dir(upgraderBin)
		renamedBin = filepath.Join(dir, "upgrader-renamed")
		main := filepath.Join(repoRoot, "cmd", "upgrader", "main.go")
		src, err := os.ReadFile(main)
		if err != nil {
			renamedErr = err
			return
		}
		patched := strings.Replace(string(src), `"max-draining",`, `"max-draining-gens",`, 1)
		if patched == string(src) {
			renamedErr = errorString("cmd/upgrader/main.go declares no \"max-draining\" flag to rename")
			return
		}
		patchedPath, overlay := filepath.Join(dir, "main-renamed.go"), filepath.Join(dir, "overlay.json")
		if renamedErr = os.WriteFile(patchedPath, []byte(patched), 0o644); renamedErr != nil {
			return
		}
		b, _ := json.Marshal(map[string]map[string]string{"Replace": {main: patchedPath}})
		if renamedErr = os.WriteFile(overlay, b, 0o644); renamedErr != nil {
			return
		}
		cmd := exec.Command("go", "build", "-race", "-overlay", overlay, "-ldflags", "-X main.version=renamed", "-o", renamedBin, "./cmd/upgrader")
		cmd.Dir, cmd.Stderr = repoRoot, os.Stderr
		renamedErr = cmd.Run()
	})
	if renamedErr != nil {
		t.Fatalf("build upgrader with --max-draining renamed: %v", renamedErr)
	}
	return renamedBin
}

type errorString string

func (e errorString) Error() string { return string(e) }

// A new build that no longer accepts a flag the running upgrader was
// started with is refused by the self-check, which is given the real
// command line: the old image serves on, with the same workers, and no
// request fails; the way back (a good binary) still works.
func TestSelfUpgradeRefusesABuildThatRejectsTheCommandLine(t *testing.T) {
	renamed := upgraderRenamedFlag(t)
	p, bin := startSelfUpgradable(t, "-l", "127.0.0.1:0", "-w", "2", "--max-draining", "3", "--", helloBin)
	p.waitReady(1)
	workers := p.workerPids(1)
	l := startLoad(loadgen.Config{Addr: p.addr(""), Clients: 16, Mode: loadgen.KeepAlive})
	l.waitServed(t, 1, 50)
	installBin(t, renamed, bin)
	out, err := p.selfUpgrade(true)
	if err == nil || !strings.Contains(out, "unknown flag: --max-draining") {
		t.Fatalf("upgrade --self to a build without --max-draining: %v, output %q; want it refused naming the flag", err, out)
	}
	st := p.status()
	if st.Pid != p.pid || st.Execs != 0 || st.Version != "dev" || !st.Ready || st.SelfUpgrade == nil || st.SelfUpgrade.OK {
		t.Fatalf("after the refusal: pid %d execs %d version %q ready %v self-upgrade %+v; want the old image (pid %d, dev) serving",
			st.Pid, st.Execs, st.Version, st.Ready, st.SelfUpgrade, p.pid)
	}
	if got := p.workerPids(1); len(got) != len(workers) || got[0] != workers[0] || got[1] != workers[1] {
		t.Fatalf("after the refusal: workers %v, want the same %v", got, workers)
	}
	l.waitServed(t, 1, 50)
	r := l.stop()
	requireNoFailures(t, r)
	t.Logf("refused build: %s", r)
	installBin(t, upgraderBin, bin)
	if out, err := p.selfUpgrade(true); err != nil {
		t.Fatalf("self-upgrade to a good build after the refusal: %v\n%s", err, out)
	}
	if st := p.status(); st.Execs != 1 || !st.Ready {
		t.Fatalf("after the good self-upgrade: execs %d ready %v", st.Execs, st.Ready)
	}
}
