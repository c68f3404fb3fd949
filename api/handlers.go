package api

import (
	"fmt"
	"io"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/gorilla/mux"
	"github.com/redis-agent/redis-agent/agent"
	"github.com/redis-agent/redis-agent/apitype"
)

func (s *server) healthz(w http.ResponseWriter, r *http.Request) {
	if err := s.live(r.Context()); err != nil {
		writeError(w, http.StatusServiceUnavailable, apitype.CodeNotAlive, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, apitype.Status{Status: "ok"})
}

// defaultLogLines is what GET .../log returns without ?lines.
const defaultLogLines = 100

func (s *server) instanceLog(w http.ResponseWriter, r *http.Request) {
	n := defaultLogLines
	if v := r.URL.Query().Get("lines"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil {
			writeError(w, http.StatusBadRequest, apitype.CodeBadRequest, "lines must be a number")
			return
		}
	}
	id := mux.Vars(r)["id"]
	lines, err := s.svc.Log(r.Context(), id, n)
	s.reply(w, r, http.StatusOK, apitype.LogLines{ID: id, Lines: lines}, err)
}

func (s *server) readyz(w http.ResponseWriter, r *http.Request) {
	if err := s.ready(r.Context()); err != nil {
		writeError(w, http.StatusServiceUnavailable, apitype.CodeNotReady, err.Error())
		return
	}
	st := apitype.Status{Status: "ready"}
	if s.details != nil {
		st.Details = s.details()
	}
	writeJSON(w, http.StatusOK, st)
}

func (s *server) listInstances(w http.ResponseWriter, r *http.Request) {
	list, err := s.svc.List(r.Context())
	s.reply(w, r, http.StatusOK, apitype.InstanceList{Instances: orEmpty(list)}, err)
}

func (s *server) putInstance(w http.ResponseWriter, r *http.Request) {
	var spec apitype.Spec
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
	s.reply(w, r, http.StatusOK, inst, err)
}

func (s *server) deleteInstance(w http.ResponseWriter, r *http.Request) {
	if err := s.svc.Deprovision(r.Context(), mux.Vars(r)["id"]); err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

func (s *server) putBinding(w http.ResponseWriter, r *http.Request) {
	// The body is optional: {} or a password to keep (a move).
	var req apitype.BindRequest
	if !decode(w, r, &req) {
		return
	}
	v := mux.Vars(r)
	creds, created, err := s.svc.Bind(r.Context(), v["id"], v["bid"], req.Password)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, createdOrOK(created), creds)
}

func (s *server) getBinding(w http.ResponseWriter, r *http.Request) {
	v := mux.Vars(r)
	creds, err := s.svc.Binding(r.Context(), v["id"], v["bid"])
	s.reply(w, r, http.StatusOK, creds, err)
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
	s.reply(w, r, http.StatusOK, inst, err)
}

func (s *server) capacity(w http.ResponseWriter, r *http.Request) {
	c, err := s.svc.Capacity(r.Context())
	s.reply(w, r, http.StatusOK, c, err)
}

func (s *server) orphans(w http.ResponseWriter, r *http.Request) {
	list, err := s.svc.Orphans(r.Context())
	s.reply(w, r, http.StatusOK, apitype.OrphanList{Orphans: orEmpty(list)}, err)
}

func (s *server) getCA(w http.ResponseWriter, r *http.Request) {
	ca, err := s.svc.CA(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	w.Header().Set("Content-Type", "application/x-pem-file")
	w.WriteHeader(http.StatusOK)
	w.Write(ca)
}

func createdOrOK(created bool) int {
	if created {
		return http.StatusCreated
	}
	return http.StatusOK
}

func (s *server) patchInstance(w http.ResponseWriter, r *http.Request) {
	var req apitype.Resize
	if !decode(w, r, &req) {
		return
	}
	if req.MemoryMB == nil && req.IO == nil && req.Settings.Empty() && req.Metadata == nil && req.Backup == nil {
		writeError(w, http.StatusUnprocessableEntity, apitype.CodeInvalid,
			"memory_mb, io, maxmemory_policy, maxmemory_clients, tls, metadata or backup is required: they are the fields that can change")
		return
	}
	if req.IO != nil {
		// Checked before anything changes.
		if err := agent.CheckIO(*req.IO); err != nil {
			s.fail(w, r, err)
			return
		}
	}
	id := mux.Vars(r)["id"]
	// Every setting is checked before anything changes.
	if err := agent.CheckSettings(req.Settings); err != nil {
		s.fail(w, r, err)
		return
	}
	var inst apitype.Instance
	var err error
	// The resize first: one refused (507, 409) changes nothing, IO limits,
	// settings
	// and metadata included.
	if req.MemoryMB != nil {
		if inst, err = s.svc.Resize(r.Context(), id, *req.MemoryMB); err != nil {
			s.fail(w, r, err)
			return
		}
	}
	if req.IO != nil {
		if inst, err = s.svc.SetIO(r.Context(), id, *req.IO); err != nil {
			s.fail(w, r, err)
			return
		}
	}
	if !req.Settings.Empty() {
		if inst, err = s.svc.Configure(r.Context(), id, req.Settings); err != nil {
			s.fail(w, r, err)
			return
		}
	}
	if req.Metadata != nil {
		if inst, err = s.svc.SetMetadata(r.Context(), id, req.Metadata); err != nil {
			s.fail(w, r, err)
			return
		}
	}
	if req.Backup != nil {
		if inst, err = s.svc.SetBackupPolicy(r.Context(), id, *req.Backup); err != nil {
			s.fail(w, r, err)
			return
		}
	}
	writeJSON(w, http.StatusOK, inst)
}

// snapshotTransfer bounds the time a snapshot download or upload may take.
const snapshotTransfer = time.Hour

// restoreAnswer bounds the time until a restore's answer is written.
const restoreAnswer = 3 * time.Hour

func (s *server) getSnapshot(w http.ResponseWriter, r *http.Request) {
	id := mux.Vars(r)["id"]
	if acceptsTrailers(r) {
		s.streamSnapshot(w, r, id)
		return
	}
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
	h.Set(apitype.SnapshotSHA256Header, snap.SHA256)
	w.WriteHeader(http.StatusOK)
	if _, err := io.Copy(w, io.LimitReader(snap.File, snap.Size)); err != nil {
		s.log.Warn("snapshot download cut short", "instance", id, "err", err)
	}
}

// acceptsTrailers reports whether the client said it takes trailer fields
// in a chunked answer (TE: trailers, RFC 9110).
func acceptsTrailers(r *http.Request) bool {
	for _, v := range r.Header.Values("TE") {
		for _, t := range strings.Split(v, ",") {
			t, _, _ = strings.Cut(t, ";")
			if strings.EqualFold(strings.TrimSpace(t), "trailers") {
				return true
			}
		}
	}
	return false
}

// streamSnapshot sends the RDB as it is made, chunked, its sha256 in a
// trailer. A making that fails half-way breaks the transfer off, so the
// client sees an error, not an end.
func (s *server) streamSnapshot(w http.ResponseWriter, r *http.Request, id string) {
	st, err := s.svc.SnapshotStream(r.Context(), id)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	defer st.Close()
	http.NewResponseController(w).SetWriteDeadline(time.Now().Add(snapshotTransfer))
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Content-Disposition", `attachment; filename="`+id+`.rdb"`)
	h.Set("Trailer", apitype.SnapshotSHA256Header)
	w.WriteHeader(http.StatusOK)
	if _, err := io.Copy(w, st); err != nil {
		s.log.Warn("snapshot stream cut short", "instance", id, "err", err)
		panic(http.ErrAbortHandler)
	}
	h.Set(apitype.SnapshotSHA256Header, st.SHA256())
}

func (s *server) putSnapshot(w http.ResponseWriter, r *http.Request) {
	from := r.URL.Query().Get("from_backup")
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		switch {
		case err == nil && mt == "application/json" && from == "":
			var req apitype.RestoreRequest
			if !decode(w, r, &req) {
				return
			}
			if req.FromBackup == "" {
				writeError(w, http.StatusUnprocessableEntity, apitype.CodeInvalid, "from_backup is required: the key of the backup to restore")
				return
			}
			from = req.FromBackup
		case err == nil && mt == "application/octet-stream" && from == "":
		case from != "":
		default:
			writeError(w, http.StatusUnsupportedMediaType, apitype.CodeUnsupportedMediaType, "a snapshot is sent as application/octet-stream; a restore from a backup names it in application/json or ?from_backup")
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
	want := r.Header.Get(apitype.SnapshotSHA256Header)
	rc := http.NewResponseController(w)
	rc.SetReadDeadline(time.Now().Add(snapshotTransfer))
	// The answer comes after the upload, the check, the load and the
	// restart on the new data: the server's write timeout (for JSON
	// answers) would drop it, and the broker would restore again.
	rc.SetWriteDeadline(time.Now().Add(restoreAnswer))
	var inst apitype.Instance
	var err error
	if from != "" {
		inst, err = s.svc.RestoreBackup(r.Context(), mux.Vars(r)["id"], from)
	} else {
		inst, err = s.svc.Restore(r.Context(), mux.Vars(r)["id"], r.Body, r.ContentLength, want)
	}
	s.reply(w, r, http.StatusOK, inst, err)
}

func (s *server) getRollout(w http.ResponseWriter, r *http.Request) {
	st, err := s.svc.RolloutStatus(r.Context())
	s.reply(w, r, http.StatusOK, st, err)
}

func (s *server) postRollout(w http.ResponseWriter, r *http.Request) {
	var req apitype.RolloutRequest
	if !decode(w, r, &req) {
		return
	}
	st, err := s.svc.StartRollout(r.Context(), req.Instances)
	s.reply(w, r, http.StatusAccepted, st, err)
}

func (s *server) postBackup(w http.ResponseWriter, r *http.Request) {
	// The answer comes once the RDB is in the bucket.
	http.NewResponseController(w).SetWriteDeadline(time.Now().Add(snapshotTransfer))
	b, err := s.svc.Backup(r.Context(), mux.Vars(r)["id"])
	s.reply(w, r, http.StatusCreated, b, err)
}

func (s *server) listBackups(w http.ResponseWriter, r *http.Request) {
	details := r.URL.Query().Get("details") == "true"
	list, err := s.svc.Backups(r.Context(), mux.Vars(r)["id"], details)
	s.reply(w, r, http.StatusOK, apitype.BackupList{Backups: orEmpty(list)}, err)
}

func (s *server) latestBackups(w http.ResponseWriter, r *http.Request) {
	http.NewResponseController(w).SetWriteDeadline(time.Now().Add(10 * time.Minute))
	list, err := s.svc.LatestBackups(r.Context(), r.URL.Query().Get("agent"))
	s.reply(w, r, http.StatusOK, apitype.BackupList{Backups: orEmpty(list)}, err)
}
