package agent

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/redis-agent/redis-agent/confine"
	"github.com/redis-agent/redis-agent/state"
	"github.com/redis-agent/redis-agent/volumes"
)

// Instance users: as root, each instance's redis-server runs as a uid and
// gid of its own, from a block no distribution hands out. systemd's
// documented ranges end at 1879048191 (the container range); the block
// of the default data directory is the 65536 ids from 1879048192, and any
// other data directory gets one of the 4095 blocks above it by its path's
// hash, so two agents on one host do not share ids.
const (
	uidBase   = 1879048192
	uidBlock  = 65536
	uidBlocks = 4096 // up to 2^31 - 1
)

// UIDRangeFor is the default block of instance uids of an agent whose
// data directory is dir.
func UIDRangeFor(dir string) (lo, hi int) {
	dir = filepath.Clean(dir)
	n := 0
	if dir != DefaultDataDir {
		sum := sha256.Sum256([]byte(dir))
		n = 1 + int(binary.BigEndian.Uint32(sum[:4])%(uidBlocks-1))
	}
	lo = uidBase + n*uidBlock
	return lo, lo + uidBlock - 1
}

// ParseUIDRange reads "MIN-MAX".
func ParseUIDRange(s string) (lo, hi int, err error) {
	a, b, ok := strings.Cut(s, "-")
	if ok {
		lo, err = strconv.Atoi(a)
		if err == nil {
			hi, err = strconv.Atoi(b)
		}
	}
	if !ok || err != nil || lo < 1000 || hi < lo || hi > 1<<31-2 {
		return 0, 0, fmt.Errorf("uid range %q: want MIN-MAX with 1000 <= MIN <= MAX < 2^31-1", s)
	}
	return lo, hi, nil
}

// uidsOn reports whether instances get users of their own.
func (s *Service) uidsOn() bool { return s.uidMax > 0 }

// ownerOf is the Redis user of rec's files: its own, else the shared one,
// else the agent's (Unowned).
func (s *Service) ownerOf(rec state.Instance) volumes.Owner {
	switch {
	case rec.UID > 0:
		return volumes.Owner{UID: rec.UID, GID: rec.UID}
	case s.cred != nil:
		return volumes.Owner{UID: int(s.cred.Uid), GID: int(s.cred.Gid)}
	}
	return volumes.Unowned
}

// credOf is the user rec's processes run as; nil is the agent's own.
func (s *Service) credOf(rec state.Instance) *syscall.Credential {
	if rec.UID > 0 {
		return &syscall.Credential{Uid: uint32(rec.UID), Gid: uint32(rec.UID), Groups: []uint32{}}
	}
	return s.cred
}

// ensureUID gives the instance id a uid of its own, when instances get
// one and it has none yet (a new record, or one an older agent ran as the
// shared user), and returns its record.
func (s *Service) ensureUID(id string) (state.Instance, error) {
	rec, err := s.store.Get(id)
	if err != nil || !s.uidsOn() || rec.UID != 0 {
		return rec, err
	}
	s.uidMu.Lock()
	defer s.uidMu.Unlock()
	uid, err := s.freeUID()
	if err != nil {
		return rec, err
	}
	rec, err = s.store.Update(id, func(r *state.Instance) error {
		if r.UID == 0 {
			r.UID = uid
		}
		return nil
	})
	if err == nil {
		s.log.Info("instance user", "instance", id, "uid", rec.UID)
	}
	return rec, err
}

// freeUID is the lowest uid of the range that no record holds, no user
// or group of the host's databases has, and no process runs as.
func (s *Service) freeUID() (int, error) {
	taken, err := s.store.UIDs()
	if err != nil {
		return 0, err
	}
	running := s.runningUIDs()
	for uid := s.uidMin; uid <= s.uidMax; uid++ {
		if taken[uid] || running[uid] {
			continue
		}
		id := strconv.Itoa(uid)
		if _, err := user.LookupId(id); err == nil {
			continue
		}
		if _, err := user.LookupGroupId(id); err == nil {
			continue
		}
		return uid, nil
	}
	return 0, fmt.Errorf("every uid of %d-%d is taken: %w", s.uidMin, s.uidMax, ErrCapacity)
}

// procUIDsTTL is how long a scan of the processes' uids serves freeUID.
const procUIDsTTL = time.Second

// runningUIDs is processUIDs, scanned at most once every procUIDsTTL
// (a scan stats every process: 2.6 ms with a thousand, under the
// admission lock): a burst of provisions scans once. A uid is handed out
// by a scan only if it was made after the uid's record was deleted, so a
// process of a deleted instance that outlived it is always seen; and the
// uids the records hold are not taken from the scan. The caller holds
// uidMu.
func (s *Service) runningUIDs() map[int]bool {
	d := s.deletes.Load()
	if s.procUIDs == nil || d != s.procUIDsDeletes || time.Since(s.procUIDsAt) >= procUIDsTTL {
		s.procUIDs, s.procUIDsAt, s.procUIDsDeletes = processUIDs(), time.Now(), d
	}
	return s.procUIDs
}

// processUIDs are the effective uids of the running processes (the
// owners of their /proc directories).
func processUIDs() map[int]bool {
	uids := map[int]bool{}
	d, err := os.Open("/proc")
	if err != nil {
		return uids
	}
	defer d.Close()
	names, _ := d.Readdirnames(-1)
	for _, n := range names {
		if n[0] < '0' || n[0] > '9' {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat("/proc/"+n, &st) == nil {
			uids[int(st.Uid)] = true
		}
	}
	return uids
}

// startCommand is the supervisor's Command of the instance id: before each
// start it gives the instance its own user if it has none (an instance an
// older agent ran as the shared user moves at its first start by this
// one), hands its files to that user, and runs binary through the
// launcher under the instance's policy.
func (s *Service) startCommand(id string) func(binary, conf string) (*exec.Cmd, error) {
	return func(binary, conf string) (*exec.Cmd, error) {
		// The launcher would fail on it too, but only in the log.
		if err := syscall.Access(binary, 1 /* X_OK */); err != nil {
			return nil, fmt.Errorf("redis-server %s: %w", binary, err)
		}
		rec, err := s.ensureUID(id)
		if err != nil {
			return nil, err
		}
		if err := s.layout.Reown(id, s.ownerOf(rec)); err != nil {
			return nil, err
		}
		// A new user is a new quota project.
		s.applyQuota(rec)
		p := s.serverPolicy(id, binary, s.layout.DataDir(id), conf)
		cmd := confine.Command(context.Background(), s.launcher, p, binary, conf)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.credOf(rec)}
		return cmd, nil
	}
}

// policy completes p with what the kernel lacks.
func (s *Service) policy(p confine.Policy) confine.Policy {
	p.NoLandlock = s.support.Landlock == 0
	p.NoSeccomp = !s.support.Seccomp
	return p
}

// confinementNotes are what /readyz and the start log say of the
// isolation the agent cannot give: none when every layer is there.
func (s *Service) confinementNotes() []string {
	var notes []string
	if s.launcher == "" {
		notes = append(notes, "redis-servers run unconfined: --confine off")
	} else if miss := s.support.Missing(); miss != "" {
		notes = append(notes, "the kernel lacks "+miss)
	}
	if !s.uidsOn() {
		who := "the agent's own user"
		if s.cred != nil {
			who = "the user " + s.cfg.RedisUser
		}
		notes = append(notes, "every redis-server runs as "+who+": no user per instance ("+s.uidReason+")")
	}
	return notes
}

// ReadyDetails are the notes /readyz shows beside its status.
func (s *Service) ReadyDetails() []string { return s.notes }

// errNoLauncher is a Validate error's cause.
var errNoLauncher = errors.New("redis-agent-launch not found")
