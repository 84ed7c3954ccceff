package inherit

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"golang.org/x/sys/unix"
)

// A parker holds handed-off connections of a client-speaks-first protocol
// (HTTP) as bare fds in an epoll set until their client sends something.
// Ten thousand idle keep-alive connections thus cost ten thousand
// epoll_ctl calls, not ten thousand net.Conns, goroutines and buffers.
//
// Its goroutine owns epfd and efd: it closes them when it ends, after
// close wakes it through efd (closing an epoll fd does not wake a thread
// blocked in epoll_wait on it, and its number could be reused meanwhile).
type parker struct {
	epfd int
	efd  int // eventfd(2) in the set: written by close to wake wait
	log  *slog.Logger

	mu        sync.Mutex
	parked    map[int]parkedConn
	closed    bool
	closeOnce sync.Once
	done      chan struct{} // closed when wait has released everything
}

type parkedConn struct {
	l     *Listener
	state []byte
}

func newParker(log *slog.Logger) (*parker, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("handoff: epoll_create1: %w", err)
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("handoff: eventfd: %w", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(efd)}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, efd, &ev); err != nil {
		unix.Close(epfd)
		unix.Close(efd)
		return nil, fmt.Errorf("handoff: epoll_ctl: %w", err)
	}
	p := &parker{epfd: epfd, efd: efd, log: log, parked: map[int]parkedConn{}, done: make(chan struct{})}
	go p.wait()
	return p, nil
}

// close delivers what is still parked, and returns once the goroutine has
// ended and closed the epoll instance and eventfd.
func (p *parker) close() {
	p.closeOnce.Do(func() {
		var one [8]byte // eventfd(2) adds a native-endian uint64
		binary.NativeEndian.PutUint64(one[:], 1)
		unix.Write(p.efd, one[:])
	})
	<-p.done
}

// park adds fd, owned by the parker from now on; if it cannot, it delivers
// the connection to l at once.
func (p *parker) park(fd int, l *Listener, state []byte) {
	p.mu.Lock()
	if !p.closed {
		p.parked[fd] = parkedConn{l, state}
		ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT, Fd: int32(fd)}
		if err := unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err == nil {
			p.mu.Unlock()
			// A Close since receive reserved it flushed without fd.
			if l.isClosed() {
				p.flush(l)
			}
			return
		}
		delete(p.parked, fd)
	}
	p.mu.Unlock()
	p.deliver(fd, l, state)
}

// wait delivers parked connections as they turn readable, until close.
func (p *parker) wait() {
	defer close(p.done)
	events := make([]unix.EpollEvent, 256)
	for stop := false; !stop; {
		n, err := unix.EpollWait(p.epfd, events, -1)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			p.log.Warn("handoff: epoll_wait failed; delivering the parked connections now", "error", err)
			stop = true
		}
		ready := make([]int, 0, n)
		for _, ev := range events[:max(n, 0)] {
			if int(ev.Fd) == p.efd {
				stop = true
				continue
			}
			ready = append(ready, int(ev.Fd))
		}
		p.take(ready)
	}
	// Nothing is parked from here on (park delivers at once), and what
	// still is goes to its listener: each was acknowledged to its sender.
	p.mu.Lock()
	p.closed = true
	rest := make([]int, 0, len(p.parked))
	for fd := range p.parked {
		rest = append(rest, fd)
	}
	p.mu.Unlock()
	p.take(rest)
	unix.Close(p.epfd)
	unix.Close(p.efd)
}

// flush delivers every connection parked for l: it is closing, and they
// must go to its server (which hands them on when it drains).
func (p *parker) flush(l *Listener) {
	p.mu.Lock()
	var fds []int
	for fd, pc := range p.parked {
		if pc.l == l {
			fds = append(fds, fd)
		}
	}
	p.mu.Unlock()
	p.take(fds)
}

// take delivers those of fds that are parked (another caller may have
// taken one meanwhile: whoever removes it from the set owns it).
func (p *parker) take(fds []int) {
	p.mu.Lock()
	var got []int
	var meta []parkedConn
	for _, fd := range fds {
		if pc, ok := p.parked[fd]; ok {
			delete(p.parked, fd)
			unix.EpollCtl(p.epfd, unix.EPOLL_CTL_DEL, fd, nil)
			got, meta = append(got, fd), append(meta, pc)
		}
	}
	p.mu.Unlock()
	for i, fd := range got {
		p.deliver(fd, meta[i].l, meta[i].state)
	}
}

// deliver turns fd into a connection for l (which counted it reserved).
func (p *parker) deliver(fd int, l *Listener, state []byte) {
	c, err := fileConn(fd)
	if err != nil {
		p.log.Warn("handoff: a connection taken could not be used, closed", "kind", l.kind, "error", err)
		l.deliver(nil, 1)
		return
	}
	l.deliver([]*Conn{{Conn: c, Kind: l.kind, State: state}}, 1)
}
