package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/supervise"
)

// Ports inside the test's own namespaces. They are fixed: nothing but the
// test listens in a namespace it created.
const (
	lbFront      = "127.0.0.1:8080" // HAProxy's frontend, on the lb namespace's lo
	hostPort     = "8080"           // each host's --listen port
	hostHealth   = "9100"           // each host's --health port
	lbBackend    = "upgrader"       // the backend in packaging/haproxy/haproxy.cfg
	shutdownWait = "1s"             // --shutdown-delay: covers inter 200ms + fastinter 100ms, see the cfg
)

// lbHost is one "host" behind HAProxy: a namespace with upgrader serving
// examples/hello, from its own copy of the upgrader binary (replaced for
// the self-upgrade).
type lbHost struct {
	t      *testing.T
	name   string // HAProxy's server name
	ns, ip string
	bin    string
	p      *proc
}

// start runs upgrader on the host and waits until generation 1 is ready.
func (h *lbHost) start() {
	h.t.Helper()
	dir := h.t.TempDir()
	ctl := filepath.Join(dir, "control.sock")
	cmd := inNetns(h.t, h.ns, h.bin, "run", "--log-format", "json", "--log-level", "debug", "--control", ctl,
		"-l", h.ip+":"+hostPort, "--health", h.ip+":"+hostHealth, "--shutdown-delay", shutdownWait, "--", helloBin)
	cmd.Dir = dir
	h.p = startProc(h.t, cmd, ctl)
	h.p.waitReady(1)
}

// current is the host's serving generation.
func (h *lbHost) current() int { return h.p.status().Current }

// TestBehindHAProxy runs two hosts, each upgrader + examples/hello with
// --health and --shutdown-delay, behind HAProxy configured by
// packaging/haproxy/haproxy.cfg, each in a network namespace of its own,
// and puts load through HAProxy (a new connection per request, and
// keep-alive clients) while the hosts are upgraded in turn, stopped and
// started again, upgraded in place (upgrader upgrade --self), and killed
// with SIGKILL and started again. Run it with scripts/balancer;
// docs/balancer.md has the figures.
func TestBehindHAProxy(t *testing.T) {
	requireNetns(t)
	sbin(t, "haproxy", "haproxy")
	v2 := upgraderV2(t)
	loadgenCmd(t) // built before the hosts start

	// Namespaces and links, unique to this test process.
	sfx := fmt.Sprint(os.Getpid())
	lbNS := newNetns(t, "upg-lb-"+sfx)
	hosts := []*lbHost{{t: t, name: "a", ip: "10.212.1.2"}, {t: t, name: "b", ip: "10.212.2.2"}}
	for i, h := range hosts {
		h.ns = newNetns(t, "upg-"+h.name+"-"+sfx)
		link(t, lbNS, "to-"+h.name, fmt.Sprintf("10.212.%d.1", i+1), h.ns, "eth0", h.ip)
		h.bin = filepath.Join(t.TempDir(), "upgrader")
		installBin(t, upgraderBin, h.bin)
		h.start()
	}

	// The shipped configuration, with the addresses given by the
	// environment it reads them from.
	lb := startHAProxy(t, lbNS, filepath.Join(repoRoot, "packaging", "haproxy", "haproxy.cfg"),
		"HAPROXY_BIND="+lbFront, "UPGRADER_HEALTH_PORT="+hostHealth,
		"UPGRADER_A="+hosts[0].ip+":"+hostPort, "UPGRADER_B="+hosts[1].ip+":"+hostPort)
	for _, h := range hosts {
		lb.waitServer(lbBackend, h.name, "up", isUp)
	}

	// served waits until HAProxy has had n more 2xx answers from host h:
	// traffic flows through it again.
	served := func(h *lbHost, n int) {
		t.Helper()
		before := lb.waitServer(lbBackend, h.name, "answering", func(serverStat) bool { return true }).n("hrsp_2xx")
		lb.waitServer(lbBackend, h.name, fmt.Sprintf("answering %d more requests", n), func(s serverStat) bool {
			return s.n("hrsp_2xx") >= before+n
		})
	}
	counters := func() map[string]serverStat {
		t.Helper()
		m, err := lb.stats(lbBackend)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}

	type modeLoad struct {
		mode string
		l    *nsLoad
	}
	// Both client kinds at once, 16 clients each: a new connection per
	// request, and keep-alive connections with idle gaps of up to 20ms.
	startLoads := func() []modeLoad {
		return []modeLoad{
			{"new connection per request", startNsLoad(t, lbNS, lbFront, "-clients", "16", "-mode", "new")},
			{"keep-alive", startNsLoad(t, lbNS, lbFront, "-clients", "16", "-mode", "keepalive", "-idle", "20ms")},
		}
	}
	progress := func(ls []modeLoad, n int) {
		t.Helper()
		for _, m := range ls {
			m.l.waitOK(n)
		}
	}
	// finish stops the load and reports it with HAProxy's counters over the
	// scenario. A failed request, or a keep-alive connection closed under
	// its client, fails the test; so does a host marked down other than
	// wantDowns times. With planned, so does any request HAProxy had to
	// send again or failed to get an answer for (wretr, wredis, econ,
	// eresp): a planned change must cost nothing even behind the retries,
	// the balancer stops sending to a host before it stops serving.
	finish := func(scenario string, ls []modeLoad, before map[string]serverStat, planned bool, wantDowns int) {
		t.Helper()
		for _, m := range ls {
			r := m.l.stop()
			t.Logf("%s, %s: %s", scenario, m.mode, r)
			if r.Requests == 0 {
				t.Errorf("%s, %s: the load generator sent no request", scenario, m.mode)
			}
			if r.Failed() != 0 || r.ClosedUnderClient != 0 {
				t.Errorf("%s, %s: %d of %d requests failed, %d connections closed under the client; want none",
					scenario, m.mode, r.Failed(), r.Requests, r.ClosedUnderClient)
			}
		}
		after := counters()
		downs, again := 0, 0
		for _, h := range hosts {
			b, a := before[h.name], after[h.name]
			d := func(f string) int { return a.n(f) - b.n(f) }
			downs += d("chkdown")
			again += d("wretr") + d("wredis") + d("econ") + d("eresp")
			t.Logf("%s, haproxy server %s: %d 2xx, %d retries, %d redispatches, %d connection errors, %d response errors, marked down %d times",
				scenario, h.name, d("hrsp_2xx"), d("wretr"), d("wredis"), d("econ"), d("eresp"), d("chkdown"))
		}
		if planned && again != 0 {
			t.Errorf("%s: HAProxy retried, redispatched or met errors %d times; want none for a planned change", scenario, again)
		}
		if downs != wantDowns {
			t.Errorf("%s: HAProxy marked hosts down %d times, want %d", scenario, downs, wantDowns)
		}
	}

	// 1. Rolling upgrade: each host in turn, 10 rounds. An upgrade never
	// turns /readyz 503, so HAProxy never takes a host out.
	before, ls := counters(), startLoads()
	progress(ls, 200)
	for round := 0; round < 10; round++ {
		for _, h := range hosts {
			h.p.upgradeTo(h.current() + 1)
			progress(ls, 50)
		}
	}
	finish("rolling upgrade (10 rounds)", ls, before, true, 0)

	// 2. Planned stop: TERM turns /readyz 503, HAProxy marks the host down
	// within --shutdown-delay, and only then does upgrader drain its
	// workers; the host is started again and HAProxy sees it up.
	before, ls = counters(), startLoads()
	progress(ls, 200)
	for _, h := range hosts {
		term := time.Now()
		h.p.signal(syscall.SIGTERM)
		lb.waitServer(lbBackend, h.name, "down", isDown)
		down := time.Since(term)
		if code := h.p.wait(30 * time.Second); code != 0 {
			t.Fatalf("host %s: graceful stop exited %d", h.name, code)
		}
		exited := time.Since(term)
		progress(ls, 100)
		start := time.Now()
		h.start()
		lb.waitServer(lbBackend, h.name, "up", isUp)
		// Figures for docs/balancer.md, not assertions.
		t.Logf("host %s: marked down by HAProxy %s after TERM, upgrader exited after %s; started again, up in HAProxy %s later",
			h.name, down.Round(time.Millisecond), exited.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
		served(h, 50)
		progress(ls, 100)
	}
	finish("planned stop with --shutdown-delay "+shutdownWait, ls, before, true, len(hosts))

	// 3. upgrader upgrade --self on each host in turn: a new upgrader
	// binary, same pid, then its workers upgraded too.
	before, ls = counters(), startLoads()
	progress(ls, 200)
	for _, h := range hosts {
		installBin(t, v2, h.bin)
		gen := h.current()
		if out, err := h.p.selfUpgrade(false); err != nil {
			t.Fatalf("host %s: upgrade --self: %v\n%s", h.name, err, out)
		}
		st := h.p.waitStatus(30*time.Second, "the workers upgraded after the self-upgrade", func(st supervise.Status) bool {
			return generationReady(st, gen+1) && genOf(st, gen) == nil
		})
		if st.Version != "v2" || st.Pid != h.p.pid {
			t.Fatalf("host %s after upgrade --self: version %q pid %d, want v2 and pid %d", h.name, st.Version, st.Pid, h.p.pid)
		}
		progress(ls, 100)
	}
	finish("upgrade --self", ls, before, true, 0)

	// 4. Crash: SIGKILL to a host's upgrader. Its workers get the drain
	// signal (parent-death signal) and close the listener: what the
	// kernel had queued on it is reset, later connects are refused, and
	// HAProxy retries those requests on the other host (retry-on,
	// option redispatch) until its checks mark the host down. The host is
	// then started again.
	before, ls = counters(), startLoads()
	progress(ls, 200)
	for _, h := range hosts {
		workers := h.p.workerPids(h.current())
		if err := syscall.Kill(h.p.pid, syscall.SIGKILL); err != nil {
			t.Fatalf("host %s: kill -9 upgrader pid %d: %v", h.name, h.p.pid, err)
		}
		<-h.p.done
		lb.waitServer(lbBackend, h.name, "down", isDown)
		for _, pid := range workers {
			waitGone(t, pid, 30*time.Second)
		}
		progress(ls, 100)
		h.start()
		lb.waitServer(lbBackend, h.name, "up", isUp)
		served(h, 50)
		progress(ls, 100)
	}
	finish("kill -9 of upgrader", ls, before, false, len(hosts))
}
