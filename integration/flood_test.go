package integration

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/supervise"
)

// floodWorker says it is ready, then sends n notify datagrams, a quarter
// each of garbage, oversized ones, FDSTORE=1 with 32 fds (within what one
// datagram may carry, so they are held until handled) and FDSTORE=1 with
// 253, and says STATUS=flooded.
const floodWorker = `
import array, os, socket, sys, time
n = int(sys.argv[1])
path = os.environ["NOTIFY_SOCKET"]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect(path)
s.send(b"READY=1")
few = array.array("i", [0] * 32)
many = array.array("i", [0] * 253)
big = b"X" * 8192
for i in range(n):
    k = i % 4
    if k == 0:
        s.send(b"garbage without an equals sign %d" % i)
    elif k == 1:
        s.send(big)
    else:
        fds = few if k == 2 else many
        s.sendmsg([b"FDSTORE=1\nFDNAME=flood"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
s.send(b"STATUS=flooded")
while True:
    time.sleep(3600)
`

// A worker floods the notify socket: the supervisor's fds stay bounded,
// its log stays small, and it answers status throughout.
func TestNotifyFloodIsBounded(t *testing.T) {
	const datagrams = 100_000
	dir := t.TempDir()
	flood := filepath.Join(dir, "flood.py")
	if err := os.WriteFile(flood, []byte(floodWorker), 0o644); err != nil {
		t.Fatal(err)
	}
	p := startUpgrader(t, "-l", "127.0.0.1:0", "--fd-store-max", "64", "--", "python3", flood, "100000")
	p.addr("")
	base := countFDs(t, p.pid)

	var mu sync.Mutex
	maxFDs, maxStatus, failures := 0, time.Duration(0), 0
	ctx, cancel := context.WithCancel(context.Background())
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for ctx.Err() == nil {
			n := countFDs(t, p.pid)
			t0 := time.Now()
			_, err := p.tryStatus()
			d := time.Since(t0)
			mu.Lock()
			maxFDs, maxStatus = max(maxFDs, n), max(maxStatus, d)
			if err != nil {
				failures++
			}
			mu.Unlock()
			time.Sleep(5 * time.Millisecond) // sampling interval
		}
	}()
	p.waitStatus(2*time.Minute, "the flood sent", func(st supervise.Status) bool {
		g := genOf(st, 1)
		return g != nil && len(g.Workers) == 1 && g.Workers[0].Status == "flooded"
	})
	cancel()
	<-sampled
	logBytes := 0
	p.mu.Lock()
	for _, line := range p.raw {
		logBytes += len(line) + 1
	}
	p.mu.Unlock()
	t.Logf("%d notify datagrams: supervisor fds %d at start, at most %d during the flood; status slowest %s; log %d bytes",
		datagrams, base, maxFDs, maxStatus, logBytes)
	if failures > 0 {
		t.Fatalf("%d status requests failed during the flood", failures)
	}
	// Kept at most --fd-store-max fds, held in queued events at most as
	// many, and one datagram being read at most as many again.
	if limit := base + 3*64 + 16; maxFDs > limit {
		t.Fatalf("supervisor held %d fds during the flood, more than %d", maxFDs, limit)
	}
	if logBytes > 1<<20 {
		t.Fatalf("the flood wrote %d bytes of log, more than 1 MiB", logBytes)
	}
	// Still works: an upgrade to a quiet worker.
	p.upgradeTo(2)
}
