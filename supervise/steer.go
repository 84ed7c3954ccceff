package supervise

import (
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/proctree"
	"github.com/seed6cb0314a/upgrader/internal/sockets"
)

// A listener per generation (Config.ListenerPerGeneration): a TCP
// listener whose socket has SO_REUSEPORT gets, for each generation, a
// socket of its own in the kernel's reuseport group of that address, and
// a classic BPF program on the group (SO_ATTACH_REUSEPORT_CBPF) sends
// every new connection to the socket of the newest ready generation. The
// old generation then takes no new connection; it is asked to drain once
// its socket's accept queue has stayed empty for Config.SteerGrace, so
// that no connection is accepted by a server that has begun to shut
// down, nor left in a queue that its close resets. The program names a
// socket by its index in the group's array, which the kernel does not
// tell: group mirrors it (a socket is appended at listen(), and one that
// closes is replaced by the last, net/core/sock_reuseport.c), and checks
// the mirror against the kernel's list of listening sockets on the
// address (sock_diag) whenever it steers or closes; a mirror that no
// longer matches (a socket of another process in the group) detaches the
// program, and the listener is shared by every generation again.

// quietMax bounds the wait for an old generation's accept queue to
// empty: a queue that stays full (a server that stopped accepting) must
// not hold its drain forever.
const quietMax = 2 * time.Second

// quietPoll is how often the accept queue is looked at during the wait.
const quietPoll = 5 * time.Millisecond

// group is the reuseport group of one listener.
type group struct {
	l *Listener
	// members mirrors the kernel's array, index order; closed ones were
	// closed by the supervisor but another process still held them at the
	// last check.
	members []member
	// broken: the mirror is not known; nothing is steered, and every
	// generation gets the listener's own socket.
	broken bool
	// attached: a program is on the group (steerTo, mend), so a socket
	// that joins gets no connection until one is steered to it.
	attached bool
	// steered: the program has sent new connections to a socket other
	// than the listener's own since the group was made or mended, so the
	// listener's holds no connection a later generation must accept
	// (freeMember).
	steered bool
	// holdAsked: holdListener has queued its upgrade since the break, so
	// a failed one is not asked for again (a release that cannot start
	// must not loop through upgrades).
	holdAsked bool
}

type member struct {
	fd     int // -1 once closed
	ino    uint64
	closed bool
	// idleRefs is the socket's reference count with no connection
	// between SYN and accept (sockets.ListenerRefs), read when it joined
	// a steered group, before anything could reach it; 0: not known.
	idleRefs int
}

// steering is the per-generation sockets of every listener.
type steering struct {
	groups []*group                 // by listener index; nil: shared
	socks  map[*generation][]int    // the fds a generation's workers get
	quiet  map[*generation]struct{} // waiting for their queues to empty
	// joining is the generation whose sockets groupSockets is choosing:
	// it gets the listener's own socket of a group that breaks meanwhile.
	joining *generation
}

// initGroups makes a group of each listener that can have one. A group
// that has other members already (the sockets of workers an upgrader that
// crashed left, the listener coming back from systemd's fd store) is not
// known, and is broken until they have gone (groupSockets).
func (s *Supervisor) initGroups() {
	if !s.cfg.ListenerPerGeneration {
		return
	}
	for i, l := range s.cfg.Listeners {
		if !sockets.ReusePort(l.sock.FD) {
			continue
		}
		ino, err := sockets.Inode(l.sock.FD)
		if err != nil {
			continue
		}
		gr := &group{l: l, members: []member{{fd: l.sock.FD, ino: ino}}}
		s.steer.groups[i] = gr
		s.checkGroup(gr)
	}
}

// groupSockets returns the fds g's workers get, a socket of its own for
// each listener in a group that is not broken, the shared one otherwise.
// A socket no live generation holds (that of any generation that has
// exited; the listener's own only until the group has been steered,
// freeMember) is taken again before a new one joins: a socket never
// leaves the group while the supervisor runs, so the array never changes
// under the program (a socket that
// leaves moves the last one, the newest generation's, to its index, and
// until the program is attached again the kernel's hash sends new
// connections to sockets nobody accepts from), and the supervisor's fds
// stay flat.
func (s *Supervisor) groupSockets(g *generation) []int {
	s.steer.joining = g
	defer func() { s.steer.joining = nil }()
	fds := make([]int, len(s.cfg.Listeners))
	for i, l := range s.cfg.Listeners {
		fds[i] = l.sock.FD
		gr := s.steer.groups[i]
		if gr != nil && gr.broken {
			s.mend(gr)
		} else if gr != nil {
			s.checkGroup(gr) // a socket joins only a group it knows
		}
		if gr == nil || gr.broken {
			continue
		}
		if fd := s.freeMember(i, g); fd >= 0 {
			fds[i] = fd
			continue
		}
		fd, err := sockets.JoinGroup(l.sock.FD)
		if err != nil {
			s.log.Error("cannot open a socket for the generation; it shares the listener's", slog.String("listener", l.Name()),
				slog.Int("generation", g.N), slog.Any("error", err))
			continue
		}
		ino, err := sockets.Inode(fd)
		if err != nil {
			unix.Close(fd)
			continue
		}
		m := member{fd: fd, ino: ino}
		if gr.attached {
			// The program sends every new connection to another
			// socket, so nothing holds a reference to this one but,
			// for an instant, someone's dump: the lower of two reads.
			for range 2 {
				if n, err := sockets.ListenerRefs(fd); err == nil && (m.idleRefs == 0 || n < m.idleRefs) {
					m.idleRefs = n
				}
			}
		}
		gr.members = append(gr.members, m)
		s.listenInodes[strconv.FormatUint(ino, 10)] = struct{}{}
		fds[i] = fd
	}
	s.steer.socks[g] = fds
	return fds
}

// freeMember returns an open socket of listener i's group that no
// generation but g holds, or -1.
//
// The listener's own socket is one only until the group has been
// steered, or while connections wait in its queue: before, it may hold
// connections queued while nobody was steered to (before upgrader began,
// or by the kernel's hash), and an old generation may leave some there
// at quietMax, which the generation that takes it must accept. After,
// and empty, it is left idle, so that
// it stays behind every generation's socket in the kernel's list of IPv4
// listening sockets (a socket joins its bucket at the head,
// net/ipv4/inet_hashtables.c): sockets.ListenerRefs then finds an old
// generation's line with another listener after it, and reads it without
// a walk of the established hash. That costs one socket more than the
// most generations alive at once. IPv6 sockets join at the tail, so there
// the newest of two alternating sockets is last half the time.
func (s *Supervisor) freeMember(i int, g *generation) int {
	held := map[int]bool{}
	for x, fds := range s.steer.socks {
		if x != g {
			held[fds[i]] = true
		}
	}
	gr := s.steer.groups[i]
	for _, m := range gr.members {
		if !m.closed && !held[m.fd] && !(m.fd == gr.l.sock.FD && gr.steered && queuesEmpty([]int{m.fd})) {
			return m.fd
		}
	}
	return -1
}

// genSocket is the fd g's workers get for listener i.
func (s *Supervisor) genSocket(g *generation, i int) int {
	if fds, ok := s.steer.socks[g]; ok {
		return fds[i]
	}
	return s.cfg.Listeners[i].sock.FD
}

// steerTo sends every new connection to g's sockets.
func (s *Supervisor) steerTo(g *generation) {
	for i, gr := range s.steer.groups {
		if gr == nil || gr.broken {
			continue
		}
		if !s.checkGroup(gr) {
			continue
		}
		fd := s.genSocket(g, i)
		idx := gr.index(fd)
		if idx < 0 {
			continue // shares the listener with an older generation
		}
		if err := sockets.Steer(fd, idx); err != nil {
			s.breakGroup(gr, err.Error())
			continue
		}
		gr.attached = true
		if fd != gr.l.sock.FD {
			gr.steered = true
		}
		s.log.Debug("new connections steered", slog.String("listener", gr.l.Name()), slog.Int("generation", g.N), slog.Int("index", idx))
	}
}

func (gr *group) index(fd int) int {
	for i, m := range gr.members {
		if !m.closed && m.fd == fd {
			return i
		}
	}
	return -1
}

// checkGroup brings the mirror up to date with the kernel's listening
// sockets on the address: closed members that have left are removed as
// the kernel removed them, swapped with the last. It breaks the group,
// and returns false, when the two cannot be matched.
func (s *Supervisor) checkGroup(gr *group) bool {
	if gr.broken || gr.l.sock.FD < 0 {
		return false // or closed: the supervisor stops
	}
	sa, err := unix.Getsockname(gr.l.sock.FD)
	if err != nil {
		s.breakGroup(gr, err.Error())
		return false
	}
	listed, err := proctree.ListeningTCP(sa)
	if err != nil {
		s.breakGroup(gr, err.Error())
		return false
	}
	var gone []uint64
	for _, m := range gr.members {
		if _, ok := listed[m.ino]; !ok {
			if !m.closed {
				s.breakGroup(gr, fmt.Sprintf("socket inode %d, open in the supervisor, is not listening", m.ino))
				return false
			}
			gone = append(gone, m.ino)
		}
	}
	// Two that left since the last check left in an order not known,
	// unless they were the last two.
	if len(gone) > 1 && !gr.tail(gone) {
		s.breakGroup(gr, fmt.Sprintf("%d closed sockets left the group at once", len(gone)))
		return false
	}
	for _, ino := range gone {
		gr.remove(ino)
	}
	if len(listed) != len(gr.members) {
		s.breakGroup(gr, fmt.Sprintf("%d sockets listen on the address, the supervisor knows of %d (a socket another process opened with SO_REUSEPORT?)",
			len(listed), len(gr.members)))
		return false
	}
	return true
}

// tail tells whether inos are the last members of the array.
func (gr *group) tail(inos []uint64) bool {
	n := len(gr.members)
	for _, m := range gr.members[n-len(inos):] {
		found := false
		for _, ino := range inos {
			found = found || ino == m.ino
		}
		if !found {
			return false
		}
	}
	return true
}

// remove takes ino out of the mirror as the kernel takes a socket out of
// the array (__reuseport_detach_sock: the last one takes its place).
func (gr *group) remove(ino uint64) {
	for i, m := range gr.members {
		if m.ino == ino {
			last := len(gr.members) - 1
			gr.members[i] = gr.members[last]
			gr.members = gr.members[:last]
			return
		}
	}
}

// mend makes a broken group known again once the kernel lists on its
// address only the sockets the supervisor holds and no generation but one
// shares the listener's own socket: then they are in the array in the
// order it knows only if there is one, so it waits for that.
func (s *Supervisor) mend(gr *group) {
	if len(gr.members) != 1 {
		return
	}
	sa, err := unix.Getsockname(gr.l.sock.FD)
	if err != nil {
		return
	}
	listed, err := proctree.ListeningTCP(sa)
	if _, ok := listed[gr.members[0].ino]; err != nil || len(listed) != 1 || !ok {
		return
	}
	// Nothing is steered while broken: the program goes back on before a
	// generation's socket joins, or the hash would give it connections
	// before it is ready.
	if err := sockets.Steer(gr.l.sock.FD, 0); err != nil {
		return
	}
	gr.broken, gr.attached, gr.holdAsked = false, true, false
	s.log.Info("listener per generation on again: the reuseport group holds only the listener's socket", slog.String("listener", gr.l.Name()))
}

// breakGroup detaches the group's program: the kernel's hash spreads new
// connections over its sockets again, and later generations share the
// listener's own socket.
func (s *Supervisor) breakGroup(gr *group, reason string) {
	gr.broken, gr.attached, gr.steered, gr.holdAsked = true, false, false, false
	var err error
	for _, m := range gr.members {
		if m.fd >= 0 {
			err = sockets.Unsteer(m.fd) // any member's fd reaches the group
			break
		}
	}
	s.log.Warn("listener per generation off for this listener: its reuseport group is not known; new connections are spread by the kernel's hash",
		slog.String("listener", gr.l.Name()), slog.String("reason", reason), slog.Any("detach_error", err))
	s.closeUnheld(gr)
	s.holdListener(gr)
}

// holdListener sees that a generation accepts from the listener's own
// socket of broken group gr: the kernel's hash sends that socket a share
// of new connections, which would wait in its queue until a later
// generation shares it. The current generation may have a socket of its
// own (the listener's is left idle once a group is steered, freeMember);
// then an upgrade is queued, whose generation shares the listener's, as
// every generation of a broken group does: it starts at the end of the
// upgrade under way (a break at its steering, promote), or at once
// (recheck). A generation whose sockets are being chosen (steer.joining)
// or that is starting gets the listener's socket already; if it fails,
// failGeneration asks again (holdListeners), once per break.
func (s *Supervisor) holdListener(gr *group) {
	if !gr.broken || s.steer.joining != nil || s.life.stopping || s.gens.current == nil {
		return // nothing serves yet: the first generation to start shares it
	}
	i := -1
	for j, x := range s.steer.groups {
		if x == gr {
			i = j
		}
	}
	for _, g := range []*generation{s.gens.current, s.gens.pending} {
		if g != nil && s.genSocket(g, i) == gr.l.sock.FD {
			return
		}
	}
	if gr.holdAsked {
		s.log.Warn("no generation accepts from the listener's own socket, to which the kernel's hash sends a share of new connections, since the upgrade that would have failed; they wait for the next upgrade",
			slog.String("listener", gr.l.Name()), slog.Int("generation", s.gens.current.N))
		return
	}
	gr.holdAsked = true
	s.log.Warn("upgrading so that a generation accepts from the listener's own socket, to which the kernel's hash now sends a share of new connections",
		slog.String("listener", gr.l.Name()), slog.Int("generation", s.gens.current.N))
	s.upgrades.queued = true
}

// holdListeners runs holdListener for every broken group.
func (s *Supervisor) holdListeners() {
	for _, gr := range s.steer.groups {
		if gr != nil {
			s.holdListener(gr)
		}
	}
}

// closeUnheld closes, in a broken group, the supervisor's copies of the
// sockets no live generation holds (the listener's own excepted): the
// hash would send them connections that nobody accepts, left waiting
// until the stop resets them. The mirror no longer matters there, so they
// leave it.
func (s *Supervisor) closeUnheld(gr *group) {
	i := gr.index(gr.l.sock.FD)
	if !gr.broken || i < 0 {
		return
	}
	held := map[int]bool{gr.l.sock.FD: true}
	for _, fds := range s.steer.socks {
		for _, fd := range fds {
			held[fd] = true
		}
	}
	kept := gr.members[:0]
	for _, m := range gr.members {
		if m.fd >= 0 && !held[m.fd] {
			unix.Close(m.fd)
			continue
		}
		kept = append(kept, m)
	}
	gr.members = kept
}

// closeGenSockets forgets the sockets of g, a generation that has
// exited: they stay open in the group, free for a later generation
// (groupSockets), and receive nothing meanwhile, since new connections
// are steered elsewhere.
func (s *Supervisor) closeGenSockets(g *generation) {
	delete(s.steer.socks, g)
	delete(s.steer.quiet, g)
	for _, gr := range s.steer.groups {
		if gr != nil && gr.broken {
			s.closeUnheld(gr) // nothing to keep them for
		}
	}
}

// recheckEvery is how often a group with a closed socket that another
// process still holds is checked (one closed before a self-upgrade by an
// earlier image): when that socket leaves, the kernel moves the last one
// to its index, and the program is pointed at the new index.
const recheckEvery = 100 * time.Millisecond

// recheck brings gr's mirror up to date and, if it changed the index of
// the newest generation's socket, steers to it again; while a closed
// member is still listed it looks again later.
func (s *Supervisor) recheck(gr *group) {
	defer s.startQueued() // the upgrade a break asks for (holdListener)
	if !s.checkGroup(gr) {
		return
	}
	if s.gens.current != nil {
		s.steerTo(s.gens.current)
	}
	for _, m := range gr.members {
		if m.closed {
			s.after(recheckEvery, evFunc{func() { s.recheck(gr) }})
			return
		}
	}
}

// whenQuiet runs then once old, just replaced by a generation new
// connections are steered to, has an empty accept queue on each socket of
// its own, and has had it empty for SteerGrace (its last connection
// answered, and a handshake begun before the steering completed), or
// after quietMax. A generation with no socket of its own runs then at
// once.
func (s *Supervisor) whenQuiet(old *generation, then func()) {
	var fds []int
	var grs []*group // fds[k]'s group
	for i, fd := range s.steer.socks[old] {
		if gr := s.steer.groups[i]; gr != nil && !gr.broken && fd != s.genSocket(s.gens.current, i) {
			fds, grs = append(fds, fd), append(grs, gr)
		}
	}
	if len(fds) == 0 {
		then()
		return
	}
	// It drains already (for status, and the cap), without being asked
	// yet; a self-upgrade waits for the ask as for a count.
	s.markDraining(old)
	s.upgrades.counting++
	s.steer.quiet[old] = struct{}{}
	start, emptySince := s.env.now(), time.Time{}
	grace, handshakes := s.cfg.SteerGrace, false
	if old.drainsByContract() {
		// A worker that takes handoffs answers every connection it has
		// accepted, and hands on those it has not read from, once asked
		// to drain (worker-contract.md): no grace is needed for it, only
		// the queue empty and no handshake under way that could still
		// complete into it (on loopback, microseconds).
		grace, handshakes = 0, true
	}
	var poll func()
	poll = func() {
		if _, ok := s.steer.quiet[old]; !ok {
			s.upgrades.counting-- // exited meanwhile
			return
		}
		now := s.env.now()
		if queuesEmpty(fds) && (!handshakes || !handshakesPending(fds, grs)) {
			if emptySince.IsZero() {
				emptySince = now
			}
		} else {
			emptySince = time.Time{}
		}
		if (!emptySince.IsZero() && now.Sub(emptySince) >= grace) || now.Sub(start) >= quietMax {
			delete(s.steer.quiet, old)
			s.upgrades.counting--
			s.log.Debug("old generation's sockets quiet", slog.Int("generation", old.N), slog.Duration("after", now.Sub(start)))
			then()
			return
		}
		s.after(quietPoll, evFunc{poll})
	}
	poll()
}

// handshakesPending tells whether a handshake is under way on any of
// fds, sockets of old generations that new connections are no longer
// steered to, each in its group in grs.
//
// A socket whose idle reference count is known (it joined a steered
// group) and reads no more than that count has none
// (sockets.ListenerRefs: tens of microseconds). Any other is asked by a
// sock_diag dump (sockets.HandshakesPending: a walk of the kernel's whole
// established hash, about a millisecond, and of the whole port, so every
// generation's sockets of the group, which errs on the side of waiting):
// the listener's own socket, which joined no group, and a count above
// the idle one, which is a handshake or a queued connection most of the
// time but may be a reference that lingers (a TCP Fast Open request its
// client reset stays on the listener's list, holding one, for up to a
// minute), so that it costs the dump and not the wait to quietMax. A
// count below the idle one becomes it; one above never does.
func handshakesPending(fds []int, grs []*group) bool {
	for k, fd := range fds {
		if m := grs[k].member(fd); m != nil && m.idleRefs > 0 {
			if refs, err := sockets.ListenerRefs(fd); err == nil && refs <= m.idleRefs {
				m.idleRefs = refs
				continue
			}
		}
		// An error: a socket that cannot be asked holds no drain.
		if n, err := sockets.HandshakesPending(fd); err == nil && n > 0 {
			return true
		}
	}
	return false
}

// member is gr's open member whose fd is fd, or nil; the pointer is good
// until the members change.
func (gr *group) member(fd int) *member {
	if i := gr.index(fd); i >= 0 {
		return &gr.members[i]
	}
	return nil
}

func queuesEmpty(fds []int) bool {
	for _, fd := range fds {
		if n, err := sockets.QueueLen(fd); err == nil && n > 0 {
			return false
		}
	}
	return true
}

// restoreGroups takes the groups of a self-upgrade's record; a record
// without them (an upgrader without listeners per generation wrote it)
// makes them as New does.
func (s *Supervisor) restoreGroups(st *State) {
	any := false
	for i, sl := range st.Listeners {
		if sl.Group == nil || i >= len(s.cfg.Listeners) {
			continue
		}
		any = true
		gr := &group{l: s.cfg.Listeners[i], broken: sl.Group.Broken, steered: sl.Group.Steered, attached: sl.Group.Attached}
		for _, m := range sl.Group.Members {
			gr.members = append(gr.members, member{fd: m.FD, ino: m.Ino, closed: m.FD < 0, idleRefs: m.IdleRefs})
			if m.FD >= 0 {
				unix.CloseOnExec(m.FD)
				s.listenInodes[strconv.FormatUint(m.Ino, 10)] = struct{}{}
			}
		}
		s.steer.groups[i] = gr
		for _, m := range gr.members {
			if m.closed {
				s.after(recheckEvery, evFunc{func() { s.recheck(gr) }})
				break
			}
		}
	}
	if !any {
		s.initGroups()
	}
}

// listenSockets returns the fds of every listening socket the supervisor
// holds for listener i: its own and those of the generations that have their own
// (steer.go), so that what quiesces a listener at a stop reaches them all.
func (s *Supervisor) listenSockets(i int) []int {
	fds := []int{s.cfg.Listeners[i].sock.FD}
	if gr := s.steer.groups[i]; gr != nil {
		for _, m := range gr.members {
			if m.fd >= 0 && m.fd != fds[0] {
				fds = append(fds, m.fd)
			}
		}
	}
	return fds
}

// closeOwnSockets closes the supervisor's copies of every generation's own
// sockets when a stop drains, for the reason closeListeners closes the
// listeners': each then goes with its generation's last copy, and a later
// connection is refused instead of queued and reset at the exit.
func (s *Supervisor) closeOwnSockets() {
	for i, gr := range s.steer.groups {
		if gr == nil {
			continue
		}
		for j, m := range gr.members {
			if m.closed || m.fd == s.cfg.Listeners[i].sock.FD || m.fd < 0 {
				continue
			}
			for _, fds := range s.steer.socks {
				if fds[i] == m.fd {
					fds[i] = -1
				}
			}
			unix.Close(m.fd)
			gr.members[j].fd, gr.members[j].closed = -1, true
		}
	}
}

// groupsInUse tells whether a listener has a reuseport group with a
// socket besides its own: what a release without listeners per
// generation cannot carry on.
func (s *Supervisor) groupsInUse() bool {
	for _, gr := range s.steer.groups {
		if gr != nil && len(gr.members) > 1 {
			return true
		}
	}
	return false
}
