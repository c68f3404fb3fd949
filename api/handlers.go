package api

import (
	"fmt"
	"io"
	"mime"
	"net/http"
	"strconv"
	"time"

	"github.com/gorilla/mux"

	"github.com/redis-agent/redis-agent/agent"
)

func (s *server) healthz(w http.ResponseWriter, r *http.Request) {
	if err := s.live(r.Context()); err != nil {
		writeError(w, http.StatusServiceUnavailable, "NotAlive", err.Error())
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

// defaultLogLines is what GET .../log returns without ?lines.
const defaultLogLines = 100

func (s *server) instanceLog(w http.ResponseWriter, r *http.Request) {
	n := defaultLogLines
	if v := r.URL.Query().Get("lines"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil {
			writeError(w, http.StatusBadRequest, "BadRequest", "lines must be a number")
			return
		}
	}
	id := mux.Vars(r)["id"]
	lines, err := s.svc.Log(r.Context(), id, n)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, struct {
		ID    string   `json:"id"`
		Lines []string `json:"lines"`
	}{id, lines})
}

func (s *server) readyz(w http.ResponseWriter, r *http.Request) {
	if err := s.ready(r.Context()); err != nil {
		writeError(w, http.StatusServiceUnavailable, "NotReady", err.Error())
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
}

func (s *server) listInstances(w http.ResponseWriter, r *http.Request) {
	list, err := s.svc.List(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if list == nil {
		list = []agent.Instance{}
	}
	writeJSON(w, http.StatusOK, map[string][]agent.Instance{"instances": list})
}

func (s *server) putInstance(w http.ResponseWriter, r *http.Request) {
	var spec agent.Spec
	if !decode(w, r, &spec) {
		return
	}
	inst, created, err := s.svc.Provision(r.Context(), mux.Vars(r)["id"], spec)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, createdOrOK(created), inst)
}

func (s *server) getInstance(w http.ResponseWriter, r *http.Request) {
	inst, err := s.svc.Get(r.Context(), mux.Vars(r)["id"])
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, inst)
}

func (s *server) deleteInstance(w http.ResponseWriter, r *http.Request) {
	if err := s.svc.Deprovision(r.Context(), mux.Vars(r)["id"]); err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

func (s *server) putBinding(w http.ResponseWriter, r *http.Request) {
	// A binding takes no parameters yet; a body, if any, must be a JSON
	// object without fields.
	var none struct{}
	if !decode(w, r, &none) {
		return
	}
	v := mux.Vars(r)
	creds, created, err := s.svc.Bind(r.Context(), v["id"], v["bid"])
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, createdOrOK(created), creds)
}

func (s *server) deleteBinding(w http.ResponseWriter, r *http.Request) {
	v := mux.Vars(r)
	if err := s.svc.Unbind(r.Context(), v["id"], v["bid"]); err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

func (s *server) restart(w http.ResponseWriter, r *http.Request) {
	id := mux.Vars(r)["id"]
	if err := s.svc.Restart(r.Context(), id); err != nil {
		s.fail(w, r, err)
		return
	}
	inst, err := s.svc.Get(r.Context(), id)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, inst)
}

func (s *server) capacity(w http.ResponseWriter, r *http.Request) {
	c, err := s.svc.Capacity(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, c)
}

func (s *server) orphans(w http.ResponseWriter, r *http.Request) {
	list, err := s.svc.Orphans(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if list == nil {
		list = []agent.Orphan{}
	}
	writeJSON(w, http.StatusOK, map[string][]agent.Orphan{"orphans": list})
}

func createdOrOK(created bool) int {
	if created {
		return http.StatusCreated
	}
	return http.StatusOK
}

// resizeRequest is the body of PATCH /v1/instances/{id}.
type resizeRequest struct {
	MemoryMB *int `json:"memory_mb"`
}

func (s *server) patchInstance(w http.ResponseWriter, r *http.Request) {
	var req resizeRequest
	if !decode(w, r, &req) {
		return
	}
	if req.MemoryMB == nil {
		writeError(w, http.StatusUnprocessableEntity, "Invalid", "memory_mb is required: it is the only field that can change")
		return
	}
	inst, err := s.svc.Resize(r.Context(), mux.Vars(r)["id"], *req.MemoryMB)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, inst)
}

// snapshotTransfer bounds the time a snapshot download or upload may take.
const snapshotTransfer = time.Hour

// restoreAnswer bounds the time until a restore's answer is written.
const restoreAnswer = 3 * time.Hour

// SnapshotSHA256Header carries the hex sha256 of a snapshot: set on a
// download, checked on an upload when given.
const SnapshotSHA256Header = "X-Snapshot-Sha256"

func (s *server) getSnapshot(w http.ResponseWriter, r *http.Request) {
	id := mux.Vars(r)["id"]
	snap, err := s.svc.Snapshot(r.Context(), id)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	defer snap.File.Close()
	// The server's write timeout is for JSON answers, not for streaming a
	// data set.
	http.NewResponseController(w).SetWriteDeadline(time.Now().Add(snapshotTransfer))
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Content-Length", strconv.FormatInt(snap.Size, 10))
	h.Set("Content-Disposition", `attachment; filename="`+id+`.rdb"`)
	h.Set(SnapshotSHA256Header, snap.SHA256)
	w.WriteHeader(http.StatusOK)
	if _, err := io.Copy(w, io.LimitReader(snap.File, snap.Size)); err != nil {
		s.log.Warn("snapshot download cut short", "instance", id, "err", err)
	}
}

func (s *server) putSnapshot(w http.ResponseWriter, r *http.Request) {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/octet-stream" {
			writeError(w, http.StatusUnsupportedMediaType, "UnsupportedMediaType", "a snapshot is sent as application/octet-stream")
			return
		}
	}
	// Each upload holds a file and a connection open for as long as the
	// client takes to send it: beyond the bound, refuse before reading.
	select {
	case s.uploads <- struct{}{}:
		defer func() { <-s.uploads }()
	default:
		s.fail(w, r, fmt.Errorf("%d restores are in progress, as many as this agent takes at once: %w", cap(s.uploads), errBusy))
		return
	}
	want := r.Header.Get(SnapshotSHA256Header)
	rc := http.NewResponseController(w)
	rc.SetReadDeadline(time.Now().Add(snapshotTransfer))
	// The answer comes after the upload, the check, the load and the
	// restart on the new data: the server's write timeout (for JSON
	// answers) would drop it, and the broker would restore again.
	rc.SetWriteDeadline(time.Now().Add(restoreAnswer))
	inst, err := s.svc.Restore(r.Context(), mux.Vars(r)["id"], r.Body, r.ContentLength, want)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, inst)
}

func (s *server) getRollout(w http.ResponseWriter, r *http.Request) {
	st, err := s.svc.RolloutStatus(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (s *server) postRollout(w http.ResponseWriter, r *http.Request) {
	var none struct{}
	if !decode(w, r, &none) {
		return
	}
	st, err := s.svc.StartRollout(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusAccepted, st)
}
